"""What every benchmark does with its figures: a JSON file when asked for one."""

import json


def save_json(result: dict, path: str | None) -> None:
    """Writes the figures to `path` (nothing when None): the raw material of a RESULTS.md row."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
