"""The glake entry point: --help, --version, inspect-memory (tables and --json)."""

import json
import subprocess
import sys

from typer.testing import CliRunner

import glakeserve
from glakeserve.cli.app import app

runner = CliRunner()


def test_help_lists_the_commands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    assert "inspect-memory" in out.output


def test_version():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and glakeserve.__version__ in out.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "glakeserve.cli.app", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and glakeserve.__version__ in out.stdout


def test_inspect_memory_json_matches_the_demo():
    out = runner.invoke(app, ["inspect-memory", "--json", "--backend", "host"])
    assert out.exit_code == 0, out.output
    snap = json.loads(out.output)
    pool, vts = snap["pool"], snap["vtensors"]
    assert pool["used_pages"] + pool["free_pages"] == pool["total_pages"]
    assert len(vts) == 4 and pool["num_vtensors"] == 4
    assert pool["shared_pages"] == 3  # req-3 aliases req-0's first three pages
    assert vts[3]["physical_pages"][:3] == vts[0]["physical_pages"][:3]
    assert pool["mappings"] == sum(len(v["mapped_pages"]) for v in vts)


def test_inspect_memory_tables():
    out = runner.invoke(app, ["inspect-memory", "--backend", "host"])
    assert out.exit_code == 0, out.output
    for text in ("Page pool", "vTensors", "Page map", "req-3"):
        assert text in out.output


def test_inspect_memory_bad_backend_is_a_clear_error():
    out = runner.invoke(app, ["inspect-memory", "--backend", "tpu"])
    assert out.exit_code == 2
    assert "unknown backend 'tpu'" in out.output
