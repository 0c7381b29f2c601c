"""`glake bench` end to end on a small random dataset (and a tiny ShareGPT sample), with the HF
baseline, JSON and plot outputs."""

import json

from typer.testing import CliRunner

from glakeserve.cli.app import app

runner = CliRunner()


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_bench_random_end_to_end(tmp_path):
    out_json, png = tmp_path / "r.json", tmp_path / "r.png"
    result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--load-format", "dummy", "--dataset", "random",
                                 "--num-prompts", "12", "--input-len", "40", "--output-len", "24",
                                 "--kv-cache-memory", "32MiB", "--output-json", str(out_json), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "Throughput:" in result.output and "requests/s" in result.output and "output tokens/s" in result.output
    data = json.loads(out_json.read_text())
    assert data["results"]["num_requests"] == 12
    assert data["results"]["output_tokens"] == 12 * 24  # EOS ignored: every request makes its tokens
    assert data["results"]["ttft_p50_ms"] is not None and data["timeline"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_hf_backend_and_sharegpt(smollm2_dir):
    result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--load-format", "dummy", "--dataset", "random",
                                 "--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--backend", "hf",
                                 "--kv-cache-memory", "16MiB"])
    assert result.exit_code == 0, result.output
    assert "Throughput:" in result.output
    result = runner.invoke(app, ["bench", "--num-prompts", "3", "--output-len", "4", "--max-model-len", "1100",
                                 "--kv-cache-memory", "96MiB"])
    assert result.exit_code == 0, result.output
    assert "Total num output tokens:  12" in result.output


def test_bench_bad_options():
    result = runner.invoke(app, ["bench", "--backend", "trt"])
    assert result.exit_code == 2 and "--backend must be glake or hf" in result.output
    result = runner.invoke(app, ["bench", "--model", "llama-99b", "--load-format", "dummy"])
    assert result.exit_code == 2 and "no dummy shape named 'llama-99b'" in result.output


def test_bad_output_paths_are_refused_before_any_work(tmp_path):
    # the model named here does not exist: the path error coming first shows nothing was loaded or run
    base = ["bench", "--model", "llama-99b", "--load-format", "dummy", "--dataset", "random"]
    result = runner.invoke(app, base + ["--output-json", "/nonexistent/x.json"])
    assert result.exit_code == 2, result.output
    assert "--output-json" in flat(result) and "/nonexistent does not exist" in flat(result)
    assert "llama-99b" not in flat(result) and "Throughput" not in flat(result)
    result = runner.invoke(app, base + ["--plot", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in flat(result)
    result = runner.invoke(app, base + ["--plot", str(tmp_path / "p.banana")])
    assert result.exit_code == 2 and "cannot write .banana files" in flat(result) and ".png" in flat(result)
    result = runner.invoke(app, ["bench", "--backend", "hf", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "hf backend" in flat(result)
    assert not list(tmp_path.iterdir())


def test_json_records_the_model_lengths_and_a_timeline_from_zero(tmp_path):
    out_json = tmp_path / "r.json"
    result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--load-format", "dummy", "--dataset", "random",
                                 "--num-prompts", "3", "--input-len", "20", "--output-len", "5",
                                 "--kv-cache-memory", "16MiB", "--output-json", str(out_json), "--enforce-eager"])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    config = data["config"]
    assert config["model"] == "tiny-llama" and config["max_model_len"] > 0 and config["dtype"] == "float32"
    assert config["enforce_eager"] is True
    assert config["input_len"] == 20 and config["output_len"] == 5
    assert config["prompt_lens"] == {"mean": 20.0, "min": 20, "max": 20, "total": 60}
    assert config["output_lens"]["total"] == 15
    first = data["timeline"][0]
    assert first["t"] == 0.0 and first["generated"] == 0 and first["waiting"] == 3


def test_a_dataset_that_is_not_sharegpt_says_what_was_expected(tmp_path):
    bad = tmp_path / "other.json"
    for content, says in (('{"data": []}', "does not start with '['"),
                          ('[{"instruction": "hi", "output": "yo"}]', 'look like {"instruction": "hi"')):
        bad.write_text(content)
        result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--load-format", "dummy", "--num-prompts", "2",
                                     "--kv-cache-memory", "16MiB", "--dataset-path", str(bad)])
        assert result.exit_code == 2, result.output
        assert "not a ShareGPT file" in flat(result) and says in flat(result) and '"conversations"' in flat(result)
