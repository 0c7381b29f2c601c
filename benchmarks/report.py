"""What every benchmark does with its figures (a JSON file when asked for one) and with an engine
it is done with (its device memory back before the next one starts)."""

import gc
import json

import torch


def save_json(result: dict, path: str | None) -> None:
    """Writes the figures to `path` (nothing when None): the raw material of a RESULTS.md row."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def close_llm(llm) -> None:
    """Closes an LLM and gives its device memory back, so the next run in the process starts clean."""
    llm.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
