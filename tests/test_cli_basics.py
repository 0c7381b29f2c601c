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
    for command in ("chat", "bench", "inspect-memory", "serve"):
        assert command in out.output


def test_version():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and glakeserve.__version__ in out.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "glakeserve.cli.app", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and glakeserve.__version__ in out.stdout


def test_inspect_memory_json_on_the_demo(smollm2_dir):
    out = runner.invoke(app, ["inspect-memory", "--json"])
    assert out.exit_code == 0, out.output
    snap = json.loads(out.output)
    pool, slots = snap["pool"], snap["slots"]
    assert pool["used_pages"] + pool["free_pages"] == pool["total_pages"]
    running = [s for s in slots if s["owner"] is not None and not s["internal"]]
    idle_with_pages = [s for s in slots if s["owner"] is None and s["mapped_pages"]]
    assert len(running) == 2 and len(idle_with_pages) == 2  # two finished early and kept their pages
    assert all(s["tokens"] > 0 and s["mapped_pages"] <= s["reserved_pages"] for s in running)
    assert snap["engine"]["running"] == 2


def test_inspect_memory_tables(smollm2_dir):
    out = runner.invoke(app, ["inspect-memory"])
    assert out.exit_code == 0, out.output
    for text in ("KV page pool", "Slots", "Page map", "idle"):
        assert text in out.output


def test_unknown_model_is_a_clear_error_not_a_traceback():
    out = runner.invoke(app, ["inspect-memory", "--model", "nobody/nothing"])
    assert out.exit_code == 2
    assert "no weights for 'nobody/nothing'" in out.output and "Traceback" not in out.output


def test_dash_h_is_help_everywhere():
    for args in (["-h"], ["chat", "-h"], ["bench", "-h"], ["inspect-memory", "-h"]):
        out = runner.invoke(app, args)
        assert out.exit_code == 0 and "Usage" in out.output, (args, out.output)
        assert "ARCHITECTURE.md" not in out.output  # the design notes are not shipped with the package


def test_set_limit_blames_itself():
    out = runner.invoke(app, ["inspect-memory", "--url", "http://127.0.0.1:9", "--set-limit", "banana"])
    assert out.exit_code == 2
    text = " ".join(out.output.split())
    assert "--set-limit" in text and "'banana'" in text and "--kv-cache-memory" not in text


def test_inspect_memory_url_takes_the_api_key_from_the_environment():
    import http.server
    import threading

    seen = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer sesame"
            body = json.dumps({"pool": {"total_pages": 1}} if ok else {"error": {"message": "bad key"}}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}"
        out = runner.invoke(app, ["inspect-memory", "--url", url, "--json"], env={"GLAKE_API_KEY": "sesame"})
        assert out.exit_code == 0, out.output
        assert json.loads(out.output) == {"pool": {"total_pages": 1}}
        out = runner.invoke(app, ["inspect-memory", "--url", url, "--json"], env={"GLAKE_API_KEY": ""})
        assert out.exit_code == 2 and "401" in out.output
    finally:
        httpd.shutdown()
    assert seen[0] == "Bearer sesame" and seen[1] is None
