"""`glake chat` driven for real in a pseudo-terminal: a chat turn, every slash command (/set format
json included), bad input,
Ctrl-C mid-reply and on an empty line, a multi-line block, Ctrl-D."""

import os
import sys
import time

import pexpect
import pytest

PROMPT = ">>>"


@pytest.fixture
def repl(tmp_path, smollm2_dir):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1")
    glake = os.path.join(os.path.dirname(sys.executable), "glake")
    child = pexpect.spawn(glake, ["chat", "--temperature", "0", "--max-tokens", "40", "--history-file",
                                  str(tmp_path / "history")], env=env, encoding="utf-8", timeout=120,
                          codec_errors="replace",  # the tty drops queued output on ^C, maybe mid-character
                          dimensions=(40, 140))
    child.expect(PROMPT)
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
    child.expect(r"\[prompt \d+ tok, [\d.]+ tok/s \| generated \d+ tok, [\d.]+ tok/s\]")
    child.expect(PROMPT)
    turn(child, "/help", "/memory")
    turn(child, "/set temperature 0.5", "temperature = 0.5")
    turn(child, "/set temperature -1", "temperature must be non-negative")
    turn(child, "/set top_p abc", "top_p takes a number")
    turn(child, "/set nonsense 1", "usage: /set PARAM VALUE")
    turn(child, "/show", r"temperature\s+0.5")
    turn(child, "/set format yaml", "format takes json")
    turn(child, "/set format json", "format = json")
    turn(child, "/show", r"format\s+json")
    turn(child, 'Give me a JSON object with the keys "city" and "country" for the capital of France.', r'\{"city": ')
    turn(child, "/set format off", "format = off")
    turn(child, "/memory", "Page map")
    turn(child, "/stats", "conversation turns")
    turn(child, "/frobnicate", "unknown command /frobnicate")
    turn(child, "/system You are a pirate.", "System prompt set")
    turn(child, "/clear", "its KV memory is free")
    child.sendline("/quit")  # /exit and /bye leave the same way
    child.expect("bye")
    child.expect(pexpect.EOF)
    assert (tmp / "history").read_text().count("/show") == 2  # input history is kept on disk


def test_ctrl_c_cancels_a_reply_and_keeps_the_session(repl):
    child, _ = repl
    child.sendline("/set max_tokens 400")
    child.expect(PROMPT)
    child.sendline("Write a very long story about dragons and knights.")
    time.sleep(3)  # let it stream for a while
    child.sendcontrol("c")
    child.expect("reply cancelled; its memory is freed")
    child.expect(PROMPT)
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
