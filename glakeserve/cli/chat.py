"""`glake chat`: an interactive chat with streaming replies and the KV memory shown live, or one
answer to a prompt given on the command line or piped in.

ChatSession holds the conversation and settings and answers each line; `run_repl` reads lines with
prompt-toolkit (history across sessions, \"\"\" multi-line blocks, tab completion of slash commands);
`ChatSession.answer_once` writes one plain answer for scripts.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from glakeserve.cli.memory_view import human_bytes, live_panel, render_snapshot
from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from glakeserve.structured import GuidedDecoding

COMMANDS = {
    "/help": "show this help",
    "/exit": "leave (also /quit, /bye, or Ctrl-D)",
    "/quit": "leave",
    "/bye": "leave",
    "/clear": "start a new conversation and free its KV memory",
    "/system": "/system TEXT: set the system prompt (and start a new conversation)",
    "/set": "/set PARAM VALUE: temperature, top_p, top_k, min_p, max_tokens, min_tokens, seed, "
            "repetition_penalty, presence_penalty, frequency_penalty, live_memory, format (json or off: "
            "replies constrained to a JSON object)",
    "/show": "/show: the current settings; /show info: model, dtype, context, KV layout, page size",
    "/save": "/save NAME: keep this conversation (system prompt and turns) on disk",
    "/load": "/load NAME: go back to a saved conversation; /load alone lists them",
    "/memory": "show the KV allocator: pool, slots, page map",
    "/stats": "show engine counters: tokens, preemptions, mapping waits",
}
SETTABLE = {f.name: f.type for f in fields(SamplingParams)
            if f.name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed",
                          "repetition_penalty", "presence_penalty", "frequency_penalty")}
FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
MAX_TEMPERATURE = 2.0  # the server's limit (OpenAI's range); hotter than this replies are noise
DEFAULT_MAX_TOKENS = 512
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAVE_FORMAT = "glake-chat/1"
TAIL_LINES = 12  # lines of the streaming reply the live view keeps on screen


def check_params(params: SamplingParams, max_model_len: int) -> SamplingParams:
    """What SamplingParams' own validation (the server's) lets through but a chat cannot use:
    infinite numbers, a temperature above the server's API limit, a reply longer than the context.
    Raises ValueError saying what to do."""
    for name in FLOATS:
        value = getattr(params, name)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}.")
    if params.temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {params.temperature}.")
    if params.max_tokens is not None and params.max_tokens >= max_model_len:
        raise ValueError(f"max_tokens must be less than the context of {max_model_len} tokens, which holds the "
                         f"conversation and the reply; got {params.max_tokens}. Ask for fewer, or start with a "
                         f"larger --max-model-len.")
    return params


def default_max_tokens(max_model_len: int) -> int:
    return min(DEFAULT_MAX_TOKENS, max_model_len // 2)


class ChatSession:
    def __init__(self, llm: LLM, console: Console, system: str | None = None, params: SamplingParams | None = None,
                 live_memory: bool = True, session_seed: int | None = None, save_dir: Path | None = None):
        self.llm = llm
        self.console = console
        self.system = system
        limit = llm.engine.max_model_len
        self.params = check_params(params or SamplingParams(temperature=0.7, top_p=0.9,
                                                            max_tokens=default_max_tokens(limit)), limit)
        self.live_memory = live_memory
        self.session_seed = session_seed
        self.save_dir = save_dir
        self.messages: list[dict] = []  # user and assistant turns, oldest first; the system prompt is apart

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    # ----- one line of input ----------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Answers a line; returns False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.reply(text)
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            t = Table(show_header=False, box=None)
            for cmd, what in COMMANDS.items():
                t.add_row(f"[bold]{cmd}[/bold]", what)
            t.add_row("[bold]\"\"\"[/bold]", "start and end a multi-line message")
            self.console.print(t)
        elif name == "/clear":
            self.clear()
            self.console.print("[dim]New conversation; its KV memory is free.[/dim]")
        elif name == "/system":
            if not arg:
                self.error("usage: /system TEXT")
            else:
                self.system = arg
                self.clear()
                self.console.print("[dim]System prompt set; new conversation.[/dim]")
        elif name == "/set":
            self.set(arg)
        elif name == "/show":
            if arg == "info":
                self.show_info()
            elif arg:
                self.error(f"usage: /show, or /show info; got /show {arg}")
            else:
                self.show()
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            self.load(arg)
        elif name == "/memory":
            self.console.print(render_snapshot(self.llm.engine.memory_snapshot()))
        elif name == "/stats":
            self.stats()
        else:
            self.error(f"unknown command {name}; /help lists the commands")
        return True

    def error(self, message: str) -> None:
        self.console.print(f"[red]error:[/red] {escape(message)}", highlight=False)

    def clear(self) -> None:
        self.messages = []
        self.llm.engine.drop_cached_kv()  # the conversation's KV sits in idle slots: give it back

    def set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        value = value.strip()
        if key == "live_memory":
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                self.error("live_memory takes on or off")
                return
            self.live_memory = value.lower() in ("on", "true", "1")
            return
        if key == "format":
            self.set_format(value)
            return
        if key not in SETTABLE or not value:
            self.error(f"usage: /set PARAM VALUE with PARAM one of {', '.join(SETTABLE)}, live_memory, format")
            return
        try:
            if value.lower() == "none":
                if key not in ("seed", "max_tokens"):
                    raise ValueError
                typed = None
            else:
                typed = float(value) if key in FLOATS else int(value)
        except ValueError:
            kind = "a number" if key in FLOATS else "a whole number" + (" or none" if key in ("seed", "max_tokens")
                                                                         else "")
            self.error(f"{key} takes {kind}, got {value!r}; the setting is unchanged")
            return
        if isinstance(typed, float) and not math.isfinite(typed):
            self.error(f"{key} must be a finite number, got {value!r}; the setting is unchanged")
            return
        try:
            params = replace(self.params, **{key: typed})
            self.params = check_params(params, self.llm.engine.max_model_len)
        except ValueError as e:
            self.error(f"{e} The setting is unchanged.")
            return
        self.console.print(f"[dim]{key} = {typed}[/dim]")

    def set_format(self, value: str) -> None:
        """json: every reply is a JSON object, through the engine's structured output (a grammar
        masks the logits); off: free text."""
        if value.lower() not in ("json", "off"):
            self.error("format takes json (replies are JSON objects) or off")
            return
        guided = GuidedDecoding("json_object") if value.lower() == "json" else None
        try:
            if guided is not None:
                self.llm.engine.compile_guided(guided)
            self.params = replace(self.params, guided=guided)
        except ValueError as e:
            self.error(str(e))
            return
        self.console.print(f"[dim]format = {format_name(self.params)}[/dim]")

    def show(self) -> None:
        e = self.llm.engine
        t = Table(show_header=False, box=None)
        t.add_row("model", f"{e.model_name} ({e.device}, {str(e.dtype).replace('torch.', '')})")
        t.add_row("max_model_len", str(e.max_model_len))
        t.add_row("system", self.system or "(the model's default)")
        for key in SETTABLE:
            value = getattr(self.params, key)
            if key == "seed" and value is None and self.session_seed is not None:
                t.add_row(key, f"none (each reply draws from the session seed {self.session_seed}; "
                               f"--seed {self.session_seed} repeats this session)")
            else:
                t.add_row(key, str(value))
        t.add_row("format", format_name(self.params))
        t.add_row("live_memory", "on" if self.live_memory else "off")
        self.console.print(t)

    def show_info(self) -> None:
        e = self.llm.engine
        s = e.stats()
        pool = s["pool"]
        t = Table(show_header=False, box=None)
        t.add_row("model", s["model"])
        t.add_row("device, dtype", f"{s['device']}, {s['dtype']}")
        t.add_row("context", f"{e.max_model_len} tokens (this conversation: {self.context_tokens()} tokens)")
        t.add_row("KV layout", s["kv_layout"])
        t.add_row("KV page", f"{human_bytes(pool['page_size'])}, {s['tokens_per_page']} tokens a page per vTensor")
        t.add_row("KV pool", f"{pool['total_pages']} pages ({human_bytes(pool['total_pages'] * pool['page_size'])}), "
                             f"{pool['used_pages']} in use")
        t.add_row("prefix caching", "on" if s["prefix_cache"] else "off")
        if self.session_seed is not None:
            t.add_row("session seed", str(self.session_seed))
        self.console.print(t)

    def stats(self) -> None:
        s = self.llm.engine.stats()
        t = Table(show_header=False, box=None)
        for key in ("prompt_tokens", "generation_tokens", "finished", "steps", "preemptions", "mapping_waits",
                    "reclaimed_pages"):
            t.add_row(key.replace("_", " "), str(s[key]))
        pool = s["pool"]
        t.add_row("pool pages used", f"{pool['used_pages']} / {pool['total_pages']}")
        t.add_row("aliased (shared) pages", str(pool["shared_pages"]))
        pc = s["prefix_cache"]
        if pc:
            t.add_row("prefix cache", f"{pc['entries']} entries, {pc['cached_pages']} pages")
            t.add_row("prefix cache hits", f"{pc['hit_tokens']} tokens reused over {pc['lookups']} lookups")
        else:
            t.add_row("prefix cache", "off")
        t.add_row("conversation turns", str(self.turns))
        self.console.print(t)

    # ----- saved conversations --------------------------------------------------------------
    def _save_path(self, name: str) -> Path | None:
        if self.save_dir is None:
            self.error("this session has no directory for saved conversations")
            return None
        if not NAME.fullmatch(name):
            self.error(f"a conversation's name is letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
            return None
        return self.save_dir / f"{name}.json"

    def save(self, name: str) -> None:
        if not name:
            self.error("usage: /save NAME")
            return
        path = self._save_path(name)
        if path is None:
            return
        if not self.messages:
            self.error("nothing to save yet: the conversation is empty")
            return
        data = {"format": SAVE_FORMAT, "model": self.llm.engine.model_name, "system": self.system,
                "messages": self.messages}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)  # a crash mid-write never leaves half a file under the name
        except OSError as e:
            self.error(f"could not save to {path}: {e.strerror or e}")
            return
        self.console.print(f"[dim]Saved {self.turns} turns as {name!r} ({escape(str(path))}); /load {name} brings them "
                           "back.[/dim]")

    def saved_names(self) -> list[str]:
        if self.save_dir is None or not self.save_dir.is_dir():
            return []
        return sorted(p.stem for p in self.save_dir.glob("*.json"))

    def load(self, name: str) -> None:
        if not name:
            names = self.saved_names()
            self.console.print("Saved conversations: " + ", ".join(names) if names else
                               "[dim]No saved conversations yet; /save NAME keeps one.[/dim]")
            return
        path = self._save_path(name)
        if path is None:
            return
        if not path.exists():
            names = self.saved_names()
            self.error(f"no saved conversation named {name!r}" +
                       (f"; saved ones: {', '.join(names)}" if names else "; /save NAME keeps one"))
            return
        try:
            system, messages = parse_saved(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            self.error(f"{path} is not a conversation glake chat saved ({e}); nothing was changed")
            return
        self.clear()
        self.system, self.messages = system, messages
        self.console.print(f"[dim]Loaded {name!r}: {self.turns} turns"
                           + (", with its system prompt" if system else "") + ".[/dim]")
        for m in messages:
            if m["role"] == "user":
                self.console.print(f">>> {m['content']}", highlight=False, markup=False)
            else:
                self.console.print(m["content"], highlight=False, markup=False)

    # ----- a chat turn ----------------------------------------------------------------------
    def conversation(self, messages: list[dict], text: str) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages + [
            {"role": "user", "content": text}]

    def context_tokens(self) -> int:
        if not self.messages:
            return 0
        convo = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return len(self.llm.engine.tokenizer.chat_ids(convo))

    def fit(self, text: str) -> tuple[list[int], list[dict], int]:
        """The prompt's token ids for `text` after the conversation, dropping the oldest turns (never
        the system prompt) until the reply has room for max_tokens. Returns (ids, the turns kept,
        turns dropped); raises ValueError when the message cannot fit even alone."""
        limit = self.llm.engine.max_model_len
        room = self.params.max_tokens or limit // 4
        tok = self.llm.engine.tokenizer
        kept, dropped = list(self.messages), 0
        while True:
            ids = tok.chat_ids(self.conversation(kept, text))
            if len(ids) + room <= limit or not kept:
                break
            kept = kept[1:]  # a turn: the user message and the replies up to the next user message
            while kept and kept[0]["role"] != "user":
                kept = kept[1:]
            dropped += 1
        if len(ids) >= limit:
            raise ValueError(f"this message takes {len(ids)} tokens with the chat template"
                             f"{' and the system prompt' if self.system else ''}, but the context holds "
                             f"{limit}: shorten it, or start with a larger --max-model-len")
        return ids, kept, dropped

    def _generate(self, ids: list[int], on_output) -> tuple[object, bool]:
        """Runs one request, calling on_output(o) for every streamed output; returns (the last
        output, cancelled). Ctrl-C only raises a flag: a step is never cut in half, so the KV
        books stay whole."""
        engine = self.llm.engine
        rid = engine.add_request(ids, self.params)
        out = None
        cancelled = []
        previous = signal.signal(signal.SIGINT, lambda *_: cancelled.append(True))
        try:
            while not cancelled and (out is None or not out.finished):
                for o in engine.step():
                    if o.request_id == rid:
                        out = o
                        on_output(o)
        finally:
            signal.signal(signal.SIGINT, previous)
        if cancelled and (out is None or not out.finished):
            engine.abort_request(rid)
            return out, True
        return out, False

    def reply(self, text: str) -> None:
        engine = self.llm.engine
        try:
            ids, kept, dropped = self.fit(text)
            engine.validate_request(ids, self.params)
        except ValueError as e:
            self.error(str(e))
            return
        if dropped:
            kept_system = "; the system prompt stays" if self.system else ""
            self.console.print(Text(f"[context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit "
                                    f"{engine.max_model_len} tokens{kept_system}]", style="yellow"))
        start = time.monotonic()
        chunks: list[str] = []
        live = Live(console=self.console, refresh_per_second=8, transient=True,
                    vertical_overflow="visible") if self.live_memory and self.console.is_terminal else None

        def show(o) -> None:
            chunks.append(o.delta_text)
            if live:
                tail = "\n".join("".join(chunks).splitlines()[-TAIL_LINES:])
                live.update(Group(Text(tail), live_panel(engine.memory_snapshot())))
            else:
                self.console.print(o.delta_text, end="", highlight=False, markup=False)

        if live:
            live.start()
        try:
            with keep_output_on_interrupt():
                out, cancelled = self._generate(ids, show)
        finally:
            if live:
                live.stop()  # transient: the live view goes; what was said is printed below
        reply = "".join(chunks)
        if live:
            self.console.print(reply, highlight=False, markup=False)
        elif reply:
            self.console.print()
        if cancelled:
            self.console.print("[yellow]^C reply cancelled; its memory is freed and this turn is not kept.[/yellow]")
            return
        if out.error:
            self.error(out.error)
            return
        self.messages = kept + [{"role": "user", "content": text}, {"role": "assistant", "content": out.text}]
        used = out.num_prompt_tokens + out.num_output_tokens
        self.console.print(self.turn_stats(out, start, used, engine.max_model_len), style="dim", highlight=False,
                           markup=False)
        if out.finish_reason == "length" and used >= engine.max_model_len:
            self.console.print("[dim]The reply reached the end of the context; the next turn drops the oldest "
                               "turns to make room.[/dim]")

    def answer_once(self, text: str, out: TextIO, err: Console) -> int:
        """One prompt, its answer written plainly to `out` as it streams. Returns the exit code:
        0 answered, 1 refused or failed, 130 cancelled with Ctrl-C."""
        try:
            ids, _, _ = self.fit(text)
            self.llm.engine.validate_request(ids, self.params)
        except ValueError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            return 1

        def write(o) -> None:
            out.write(o.delta_text)
            out.flush()

        result, cancelled = self._generate(ids, write)
        out.write("\n")
        out.flush()
        if cancelled:
            err.print("[yellow]^C cancelled[/yellow]")
            return 130
        if result.error:
            err.print(f"[red]error:[/red] {escape(result.error)}", highlight=False)
            return 1
        return 0

    @staticmethod
    def turn_stats(out, start: float, used: int, limit: int) -> str:
        m = out.metrics
        ttft = max(1e-9, (m.first_token_time or start) - m.arrival_time)
        gen = (m.finished_time or m.first_token_time) - m.first_token_time if m.first_token_time else 0.0
        n = out.num_output_tokens
        gen_rate = (n - 1) / gen if n > 1 and gen > 0 else 0.0
        return (f"[prompt {out.num_prompt_tokens} tok, {out.num_prompt_tokens / ttft:.1f} tok/s | "
                f"generated {n} tok, {gen_rate:.1f} tok/s | context {used}/{limit} tok ({100 * used / limit:.0f}%)]")


@contextlib.contextmanager
def keep_output_on_interrupt():
    """While a reply streams, the terminal must not change what is on screen behind the live
    view's back, or the view erases the wrong lines when it stops. Ctrl-C makes the terminal throw
    away output not shown yet (unless NOFLSH is set) and echo "^C", which wraps a full-width line
    (unless ECHO is off; keys typed meanwhile are still read at the next prompt)."""
    import termios

    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        saved = termios.tcgetattr(fd)
    except (termios.error, ValueError, OSError):  # not a terminal (or no file at all): nothing to keep
        yield
        return
    attrs = list(saved)
    attrs[3] = (attrs[3] | termios.NOFLSH) & ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def parse_saved(data) -> tuple[str | None, list[dict]]:
    """(system prompt, turns) of a saved conversation; ValueError naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise ValueError(f"expected a JSON object with format {SAVE_FORMAT!r}")
    system, messages = data.get("system"), data.get("messages")
    if system is not None and not isinstance(system, str):
        raise ValueError("system must be a string or null")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be {{role: user or assistant, content: text}}")
    if messages[0]["role"] != "user":
        raise ValueError("the first message must be the user's")
    return system, [{"role": m["role"], "content": m["content"]} for m in messages]


def format_name(params: SamplingParams) -> str:
    """What /show and /set print for the reply format: off, json (any JSON object), or the kind of
    another constraint the params came with."""
    if params.guided is None:
        return "off"
    return "json" if params.guided.kind == "json_object" else params.guided.kind


def read_message(session, first: str) -> str:
    """A \"\"\" block runs until a line ending in \"\"\"; anything else is one line."""
    if not first.lstrip().startswith('"""'):
        return first
    body = first.lstrip()[3:]
    if body.rstrip().endswith('"""'):
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        line = session.prompt("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(line)


def run_repl(chat: ChatSession, history_file: Path) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory

    history_file.parent.mkdir(parents=True, exist_ok=True)
    completer = WordCompleter(list(COMMANDS), sentence=True, match_middle=False)
    session = PromptSession(history=FileHistory(str(history_file)), completer=completer)
    console = chat.console
    console.print(f"[bold]glake chat[/bold] · {chat.llm.engine.model_name} · /help for commands, Ctrl-D to exit")
    while True:
        try:
            line = session.prompt(">>> ")
            text = read_message(session, line)
        except KeyboardInterrupt:
            console.print("[dim]Use /exit or Ctrl-D to leave.[/dim]")
            continue
        except EOFError:
            break
        if not chat.handle(text):
            break
    console.print("[dim]bye[/dim]")
