"""`glake chat`: an interactive chat with streaming replies and the KV memory shown live.

ChatSession holds the conversation and settings and answers each line; `run_repl` reads lines with
prompt-toolkit (history across sessions, \"\"\" multi-line blocks, tab completion of slash commands).
"""

from __future__ import annotations

import signal
import time
from dataclasses import fields, replace
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from glakeserve.cli.memory_view import live_panel, render_snapshot
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
    "/show": "show the current settings",
    "/memory": "show the KV allocator: pool, slots, page map",
    "/stats": "show engine counters: tokens, preemptions, mapping waits",
}
SETTABLE = {f.name: f.type for f in fields(SamplingParams)
            if f.name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed",
                          "repetition_penalty", "presence_penalty", "frequency_penalty")}
TAIL_LINES = 12  # lines of the streaming reply the live view keeps on screen


class ChatSession:
    def __init__(self, llm: LLM, console: Console, system: str | None = None, params: SamplingParams | None = None,
                 live_memory: bool = True):
        self.llm = llm
        self.console = console
        self.system = system
        self.params = params or SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
        self.live_memory = live_memory
        self.messages: list[dict] = []
        self.turns = 0

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
            self.show()
        elif name == "/memory":
            self.console.print(render_snapshot(self.llm.engine.memory_snapshot()))
        elif name == "/stats":
            self.stats()
        else:
            self.error(f"unknown command {name}; /help lists the commands")
        return True

    def error(self, message: str) -> None:
        self.console.print(f"[red]error:[/red] {message}", highlight=False)

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
            typed = None if value.lower() == "none" else (float(value) if "float" in str(SETTABLE[key]) else int(value))
        except ValueError:
            self.error(f"{key} takes a number, got {value!r}")
            return
        try:
            self.params = replace(self.params, **{key: typed})
        except ValueError as e:
            self.error(str(e))
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
            t.add_row(key, str(getattr(self.params, key)))
        t.add_row("format", format_name(self.params))
        t.add_row("live_memory", "on" if self.live_memory else "off")
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

    # ----- a chat turn ----------------------------------------------------------------------
    def reply(self, text: str) -> None:
        engine = self.llm.engine
        conversation = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        conversation.append({"role": "user", "content": text})
        try:
            ids = engine.tokenizer.chat_ids(conversation)
            rid = engine.add_request(ids, self.params)
        except ValueError as e:
            self.error(str(e))
            return
        start = time.monotonic()
        reply, out = "", None
        live = Live(console=self.console, refresh_per_second=8, transient=True,
                    vertical_overflow="visible") if self.live_memory and self.console.is_terminal else None
        # Ctrl-C only raises a flag: a step is never cut in half, so the KV books stay whole
        cancelled = []
        previous = signal.signal(signal.SIGINT, lambda *_: cancelled.append(True))
        try:
            if live:
                live.start()
            while not cancelled and (out is None or not out.finished):
                for o in engine.step():
                    if o.request_id != rid:
                        continue
                    out = o
                    reply += o.delta_text
                    if live:
                        tail = "\n".join(reply.splitlines()[-TAIL_LINES:])
                        live.update(Group(Text(tail), live_panel(engine.memory_snapshot())))
                    else:
                        self.console.print(o.delta_text, end="", highlight=False, markup=False)
        finally:
            signal.signal(signal.SIGINT, previous)
            if live:
                live.stop()
        if cancelled and (out is None or not out.finished):
            engine.abort_request(rid)
            self.console.print(("\n" if reply and not live else "") +
                               "[yellow]^C reply cancelled; its memory is freed and this turn is not kept.[/yellow]")
            return
        if live:
            self.console.print(reply, highlight=False, markup=False)
        else:
            self.console.print()
        if out.error:
            self.error(out.error)
            return
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": out.text}]
        self.turns += 1
        self.console.print(self.turn_stats(out, start), style="dim", highlight=False, markup=False)

    @staticmethod
    def turn_stats(out, start: float) -> str:
        m = out.metrics
        ttft = max(1e-9, (m.first_token_time or start) - m.arrival_time)
        gen = (m.finished_time or m.first_token_time) - m.first_token_time if m.first_token_time else 0.0
        n = out.num_output_tokens
        gen_rate = (n - 1) / gen if n > 1 and gen > 0 else 0.0
        return (f"[prompt {out.num_prompt_tokens} tok, {out.num_prompt_tokens / ttft:.1f} tok/s | "
                f"generated {n} tok, {gen_rate:.1f} tok/s]")


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
