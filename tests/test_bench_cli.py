"""`glake bench` end to end on a small random dataset (and a tiny ShareGPT sample), with the HF
baseline, JSON and plot outputs."""

import json

from typer.testing import CliRunner

from glakeserve.cli.app import app

runner = CliRunner()


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
