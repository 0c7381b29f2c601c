"""The `glake` command line."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

import glakeserve

app = typer.Typer(
    name="glake",
    help="GlakeServe: LLM inference with a KV cache in vTensors (virtual memory, mapped page by page).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"glake {glakeserve.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


@app.command("inspect-memory")
def inspect_memory(
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON, for scripts.")] = False,
    backend: Annotated[str, typer.Option(help="auto, cuda or host.")] = "auto",
    pool_pages: Annotated[int, typer.Option(min=1, help="Pages in the demo's pool.")] = 96,
) -> None:
    """Show the allocator's state: pool totals, each vTensor's pages, and a page map."""
    from glakeserve.cli.demo import run_demo
    from glakeserve.cli.memory_view import render_snapshot
    from glakeserve.vtensor import VmmError

    try:
        pool = run_demo(pool_pages=pool_pages, backend=backend)
    except (VmmError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    try:
        snap = pool.snapshot()
    finally:
        pool.close()
    if as_json:
        print(json.dumps(snap, indent=2))
    else:
        console.print(render_snapshot(snap))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
