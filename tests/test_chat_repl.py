"""`glake chat` driven for real in a pseudo-terminal: a chat turn, every slash command (/set format
json included), bad input,
Ctrl-C mid-reply and on an empty line, a multi-line block, Ctrl-D; a conversation that outgrows the
context; /save and /load; and the one-shot and piped modes scripts use."""

import io
import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pyte
import pytest

PROMPT = ">>>"
GLAKE = os.path.join(os.path.dirname(sys.executable), "glake")
STATUS = r"\[prompt \d+ tok, [\d.]+ tok/s \| generated \d+ tok, [\d.]+ tok/s \| context (\d+)/(\d+) tok \(\d+%\)\]"


def spawn(tmp_path, *args, rows=40, cols=140):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(GLAKE, ["chat", "--temperature", "0", "--history-file", str(tmp_path / "history"),
                                  "--save-dir", str(tmp_path / "saved"), *args], env=env, encoding="utf-8",
                          timeout=120,
                          codec_errors="replace",  # the tty drops queued output on ^C, maybe mid-character
                          dimensions=(rows, cols))
    child.logfile_read = io.StringIO()  # everything the terminal was sent, to render it as a screen
    child.expect(PROMPT)
    return child


@pytest.fixture
def repl(tmp_path, smollm2_dir):
    child = spawn(tmp_path, "--max-tokens", "40")
    yield child, tmp_path
    if child.isalive():
        child.terminate(force=True)


def turn(child, text, expect):
    child.sendline(text)
    child.expect(expect)
    child.expect(PROMPT)


def test_chat_turn_commands_and_exit(repl):
    child, tmp = repl
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect(STATUS)
    child.expect(PROMPT)
    turn(child, "/help", "/memory")
    turn(child, "/set temperature 0.5", "temperature = 0.5")
    turn(child, "/set temperature -1", "temperature must be non-negative")
    turn(child, "/set top_p abc", "top_p takes a number")
    turn(child, "/set nonsense 1", "usage: /set PARAM VALUE")
    turn(child, "/show", r"temperature\s+0.5")
    turn(child, "/show info", r"KV page\s+[\d.]+ [KMG]iB, \d+ tokens a page")
    turn(child, "/set format json", "format = json")
    turn(child, "/show", r"format\s+json")
    turn(child, 'Give me a JSON object with the keys "city" and "country" for the capital of France.', r'\{')
    turn(child, "/set format off", "format = off")
    turn(child, "/memory", "Page map")
    turn(child, "/stats", r"conversation turns\s+2")
    turn(child, "/frobnicate", "unknown command /frobnicate")
    turn(child, "/system You are a pirate.", "System prompt set")
    turn(child, "/clear", "its KV memory is free")
    child.sendline("/quit")  # /exit and /bye leave the same way
    child.expect("bye")
    child.expect(pexpect.EOF)
    assert (tmp / "history").read_text().count("/show") == 3  # input history is kept on disk


def screen_text(child, rows=40, cols=140) -> list[str]:
    """The terminal's lines as a user sees them now (escape codes applied, erased text gone)."""
    screen = pyte.Screen(cols, rows)
    pyte.Stream(screen).feed(child.logfile_read.getvalue())
    return [line.rstrip() for line in screen.display]


def test_ctrl_c_keeps_the_partial_reply_on_screen_and_the_session(tmp_path, smollm2_dir):
    child = spawn(tmp_path, "--max-tokens", "400", rows=50, cols=60)
    child.sendline("Write a very long story about dragons and knights.")
    child.expect(r"mapped, (\d+) tok")  # the live panel counts the slot's tokens
    prompt_tokens = int(child.match.group(1))
    while True:  # ^C once some 30 tokens have streamed: a few lines at 60 columns
        child.expect(r"mapped, (\d+) tok")
        if int(child.match.group(1)) >= prompt_tokens + 30:
            break
    child.sendcontrol("c")
    child.expect("reply cancelled; its memory is freed")
    child.expect(PROMPT)
    lines = screen_text(child, rows=50, cols=60)
    asked = next(i for i, line in enumerate(lines) if "dragons and knights" in line)
    cancelled = next(i for i, line in enumerate(lines) if "reply cancelled" in line)
    reply = [line for line in lines[asked + 1:cancelled] if line.strip()]
    words = " ".join(reply).split()
    assert len(reply) >= 2 and len(words) >= 15, lines  # the whole partial reply, not its first line
    assert not any("KV memory" in line for line in lines)  # the live panel itself is gone
    time.sleep(0.5)
    child.sendcontrol("c")  # on an empty line
    child.expect("Use /exit or Ctrl-D to leave")
    child.expect(PROMPT)
    turn(child, "/stats", r"conversation turns\s+0")  # the cancelled turn was not kept
    child.sendline('"""')
    child.expect(r"\.\.\.")
    child.sendline("Reply with one word:")
    child.expect(r"\.\.\.")
    child.sendline('yes or no?"""')
    child.expect(r"\[prompt \d+ tok")
    child.expect(PROMPT)
    child.sendeof()
    child.expect("bye")
    child.expect(pexpect.EOF)


def test_full_context_drops_old_turns_bad_settings_and_save_load(tmp_path, smollm2_dir):
    child = spawn(tmp_path, "--max-model-len", "160", "--max-tokens", "32", "--no-live-memory")
    # values SamplingParams alone would take, but a chat cannot use; each refusal keeps the session
    turn(child, "/set temperature inf", "temperature must be a finite number")
    turn(child, "/set temperature 5", r"temperature must be in \[0, 2\]")
    turn(child, "/set top_p nan", "top_p must be a finite number")
    turn(child, "/set max_tokens 100000", "max_tokens must be less than the context of 160 tokens")
    turn(child, "/set max_tokens 1.5", "max_tokens takes a whole number")
    turn(child, "/set format yaml", "format takes json")
    turn(child, "/show", r"max_tokens\s+32")
    things = ("an apple", "the sea", "a cat", "Paris", "a tree")
    questions = [f"Describe {thing} in three sentences." for thing in things]
    dropped = False
    for q in questions:
        child.sendline(q)
        i = child.expect([r"context full: dropped the \d+ oldest turns? to fit 160 tokens", STATUS])
        if i == 0:
            dropped = True
            child.expect(STATUS)
        used, limit = int(child.match.group(1)), int(child.match.group(2))
        assert limit == 160 and used <= 160
        child.expect(PROMPT)
    assert dropped  # five long turns cannot fit in 160 tokens, yet every one was answered
    child.sendline("/stats")
    child.expect(r"conversation turns\s+(\d+)")
    kept = int(child.match.group(1))
    assert 1 <= kept < len(questions)
    child.expect(PROMPT)
    turn(child, "/save bad/name", "a conversation's name is letters, digits")
    turn(child, "/save trivia", "Saved")
    saved = json.loads((tmp_path / "saved" / "trivia.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == questions[-kept:]
    turn(child, "/clear", "New conversation")
    turn(child, "/load nothing", "no saved conversation named 'nothing'; saved ones: trivia")
    child.sendline("/load trivia")
    child.expect(f"Loaded 'trivia': {kept} turns")
    child.expect(re.escape(f">>> {questions[-1]}"))
    child.expect(PROMPT)
    turn(child, "/stats", rf"conversation turns\s+{kept}")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def run_chat(*args, stdin=None):
    return subprocess.run([GLAKE, "chat", "--temperature", "0", *args], input=stdin, capture_output=True, text=True,
                          timeout=180)


def test_one_shot_prompt_and_piped_input(smollm2_dir):
    out = run_chat("--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "\x1b" not in out.stdout and ">>>" not in out.stdout
    # piped: stdin is the prompt (after the one given as arguments); no prompt-toolkit, no REPL
    out = run_chat("--max-tokens", "12", "Answer in one word. What is the capital of", stdin="France?\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "not a terminal" not in out.stdout + out.stderr
    # errors: a non-zero code and a message, never a traceback
    out = run_chat("--max-model-len", "64", "--max-tokens", "8", stdin="word " * 100)
    assert out.returncode == 1 and "shorten it" in out.stderr and "Traceback" not in out.stderr
    out = run_chat("--temperature", "inf", "hello")
    assert out.returncode == 2 and "temperature must be a finite number" in out.stderr
    out = run_chat(stdin="")
    assert out.returncode == 2 and "no prompt" in out.stderr
