"""The `glake` command line: chat, bench, inspect-memory, serve."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

import glakeserve
from glakeserve.cli import options as O

app = typer.Typer(
    name="glake",
    help="GlakeServe: LLM inference with a KV cache in vTensors (virtual memory, mapped page by page).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def make_llm(status_console: Console | None = None, **kwargs):
    """An LLM, or a one-line error that says what to do (no traceback)."""
    from glakeserve.distributed.workers import TensorParallelError
    from glakeserve.llm import LLM
    from glakeserve.vtensor import VmmError

    try:
        with (status_console or console).status("loading the model (the first start converts it; later starts "
                                                "are fast)..."):
            return LLM(**kwargs)
    except (ValueError, FileNotFoundError, VmmError, TensorParallelError) as e:
        fail(str(e))


def _version(value: bool) -> None:
    if value:
        console.print(f"glake {glakeserve.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


@app.command()
def chat(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="[MODEL] [PROMPT]...", show_default=False,
        help="A model (as --model; taken as one when it names a model here) and/or a prompt. With a prompt, "
             "or with input piped in, chat prints one answer and exits (non-zero on error).")] = None,
    model: O.Model = None, dtype: O.Dtype = "auto", device: O.Device = "auto", max_model_len: O.MaxModelLen = None,
    kv_cache_memory: O.KVMemory = None,
    load_format: Annotated[Optional[str], typer.Option(
        help="auto (dense weights), gguf (a GGUF's own 4-bit/8-bit tensors, CPU only), or dummy. Default: gguf "
             "for a GGUF model on the CPU (the fastest there), else auto.", show_default=False)] = None,
    kv_layout: O.KVLayout = "token-major",
    seed: Annotated[Optional[int], typer.Option(
        min=0, help="Seed of the session's sampling (default: a fresh one each session, shown by /show).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy; at most 2.")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    top_k: Annotated[int, typer.Option(help="0 disables.")] = 0,
    min_p: Annotated[float, typer.Option()] = 0.0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    max_tokens: Annotated[Optional[int], typer.Option(
        help="Longest reply, in tokens (default 512, at most half the context).", show_default=False)] = None,
    reply_format: Annotated[Optional[str], typer.Option(
        "--format", help="json: every reply is a JSON object (structured output; /set format off lifts it).")] = None,
    live_memory: Annotated[bool, typer.Option(help="Show the KV memory live while a reply streams.")] = True,
    history_file: Annotated[Optional[Path], typer.Option(help="Where the input history is kept.")] = None,
    save_dir: Annotated[Optional[Path], typer.Option(
        help="Where /save and /load keep conversations (default: the user data directory).")] = None,
    no_prefix_caching: O.NoPrefixCaching = False,
    tensor_parallel_size: O.TensorParallelSize = 1,
) -> None:
    """Chat with a model in the terminal; replies stream, and the KV memory is shown live.
    `glake chat "PROMPT"` or `echo PROMPT | glake chat` answers once and exits."""
    import secrets
    import sys
    from dataclasses import replace

    from glakeserve.cli.chat import ChatSession, check_params, default_max_tokens, run_repl
    from glakeserve.sampling import SamplingParams

    words = list(args or [])
    if model is None and words and _names_a_model(words[0], load_format or "auto"):
        model = words.pop(0)
    if load_format is None:
        load_format = "gguf" if tensor_parallel_size == 1 and _quantized_gguf_fits(model, device, dtype) else "auto"
    prompt = " ".join(words) or None
    if not sys.stdin.isatty():  # piped input is the prompt (after any given on the command line)
        piped = sys.stdin.read().strip()
        prompt = "\n\n".join(p for p in (prompt, piped) if p)
        if not prompt:
            fail("no prompt: the input piped in was empty (give a prompt, or run glake chat in a terminal)")
    one_shot = prompt is not None
    session_seed = seed if seed is not None else secrets.randbits(31)
    try:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                max_tokens=1 if max_tokens is None else max_tokens)
        check_params(params, 2**62)  # the checks that need no model; max_tokens is checked once it is loaded
    except ValueError as e:
        fail(str(e))
    if reply_format not in (None, "json"):
        fail(f"--format takes json, got {reply_format!r}")
    llm = make_llm(**O.engine_kwargs(model, dtype, device, max_model_len, 1, None, kv_cache_memory, load_format,
                                     kv_layout, session_seed), enable_prefix_caching=not no_prefix_caching,
                   tensor_parallel_size=tensor_parallel_size, status_console=err_console if one_shot else console)
    if llm.tokenizer is None or not llm.tokenizer.has_chat_template:
        fail("this model has no chat template; use `glake serve` with /v1/completions instead")
    limit = llm.engine.max_model_len
    try:
        reply_cap = max_tokens or default_max_tokens(limit)
        params = check_params(replace(params, max_tokens=reply_cap), limit)
    except ValueError as e:
        fail(str(e).replace("max_tokens", "--max-tokens", 1))
    if reply_format == "json":
        from glakeserve.structured import GuidedDecoding

        guided = GuidedDecoding("json_object")
        llm.engine.compile_guided(guided)
        params = replace(params, guided=guided)
    if save_dir is None or history_file is None:
        import platformdirs

        data = Path(platformdirs.user_data_dir("glakeserve"))
        save_dir = save_dir or data / "conversations"
        history_file = history_file or data / "chat_history"
    session = ChatSession(llm, console, system=system, params=params, live_memory=live_memory and not one_shot,
                          session_seed=session_seed, save_dir=save_dir)
    from glakeserve.distributed.workers import TensorParallelError

    try:
        if one_shot:
            raise typer.Exit(session.answer_once(prompt, sys.stdout, err_console))
        run_repl(session, history_file)
    except TensorParallelError as e:  # a rank failed: the engine cannot go on
        fail(str(e), code=1)
    finally:
        llm.close()  # under tensor parallelism: every rank's process goes now


def _quantized_gguf_fits(model: str | None, device: str, dtype: str) -> bool:
    """Whether chat's default runs a GGUF's own quantized tensors: a GGUF model (the embedded one
    or a .gguf file) on the CPU, in float32 or bfloat16 activations."""
    from glakeserve.engine import resolve_device
    from glakeserve.model.loader import DEFAULT_ALIASES

    spec = (model or "default").strip()
    is_gguf = spec.lower() in DEFAULT_ALIASES or (spec.endswith(".gguf") and Path(spec).expanduser().is_file())
    try:
        on_cpu = resolve_device(device).type == "cpu"
    except ValueError:
        return False  # the engine reports the bad device
    return is_gguf and on_cpu and dtype in ("auto", "float32", "fp32", "float", "bfloat16", "bf16")


def _names_a_model(word: str, load_format: str) -> bool:
    """Whether chat's first positional argument is a model rather than the prompt: it is when it
    names weights on this machine (or, with --load-format dummy, always: a shape is expected)."""
    from glakeserve.model.loader import resolve_model

    if load_format == "dummy":
        return True
    try:
        resolve_model(word, load_format)
    except ValueError:
        return False
    return True


@app.command()
def bench(
    model: O.Model = None, dtype: O.Dtype = "auto", device: O.Device = "auto", max_model_len: O.MaxModelLen = None,
    max_num_seqs: O.MaxNumSeqs = None, max_num_batched_tokens: O.MaxBatchedTokens = None,
    kv_cache_memory: O.KVMemory = None, load_format: O.LoadFormat = "auto", kv_layout: O.KVLayout = "token-major",
    seed: Annotated[int, typer.Option(help="Seed of the dataset shuffle and of the requests.")] = 0,
    dataset: Annotated[str, typer.Option(help="sharegpt or random.")] = "sharegpt",
    dataset_path: Annotated[Optional[Path], typer.Option(help="A ShareGPT JSON (default: the packaged one).")] = None,
    num_prompts: Annotated[int, typer.Option(min=1)] = 100,
    input_len: Annotated[int, typer.Option(min=1, help="random: prompt tokens.")] = 256,
    output_len: Annotated[Optional[int], typer.Option(
        min=1, help="Output tokens (random: required length; sharegpt: overrides the dataset's).")] = None,
    no_prefix_caching: O.NoPrefixCaching = False,
    backend: Annotated[str, typer.Option(help="glake, or hf for HF transformers as the in-run baseline.")] = "glake",
    hf_batch_size: Annotated[int, typer.Option(min=1, help="hf backend: requests per generate() call.")] = 16,
    output_json: Annotated[Optional[Path], typer.Option(help="Write the figures and the timeline here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG: tokens/s, running requests, mapped vs reserved KV.")]
    = None,
    tensor_parallel_size: O.TensorParallelSize = 1,
    enforce_eager: O.EnforceEager = False, attention_backend: O.AttentionBackend = "auto",
) -> None:
    """Offline throughput on ShareGPT or random prompts, reported as vLLM's benchmark does."""
    from glakeserve.cli import bench as B
    from glakeserve.datasets import sample_random, sample_sharegpt

    if backend not in ("glake", "hf"):
        fail(f"--backend must be glake or hf, got {backend!r}")
    if dataset not in ("sharegpt", "random"):
        fail(f"--dataset must be sharegpt or random, got {dataset!r}")
    if backend == "hf" and tensor_parallel_size != 1:
        fail("--backend hf runs HF transformers on one device; drop --tensor-parallel-size for it")
    if plot and backend == "hf":
        fail("--plot draws the glake engine's step timeline, which the hf backend does not have; drop --plot")
    try:  # before any work: a path that cannot be written must not cost the whole run
        if output_json:
            B.check_output_path(output_json, "--output-json")
        if plot:
            B.check_output_path(plot, "--plot", B.plot_formats())
    except ValueError as e:
        fail(str(e))
    kwargs = O.engine_kwargs(model, dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens,
                             kv_cache_memory, load_format, kv_layout, seed)
    kwargs["enable_prefix_caching"] = not no_prefix_caching
    kwargs["tensor_parallel_size"] = tensor_parallel_size
    kwargs["enforce_eager"] = enforce_eager
    kwargs["attention_backend"] = attention_backend
    llm = make_llm(**kwargs)
    engine = llm.engine
    try:
        if dataset == "sharegpt":
            if engine.tokenizer is None:
                fail("ShareGPT prompts need a tokenizer; use --dataset random with this model")
            reqs = sample_sharegpt(engine.tokenizer, num_prompts, seed=seed, path=dataset_path,
                                   fixed_output_len=output_len,
                                   max_total_len=min(2048, engine.max_model_len - 1),
                                   max_prompt_len=min(1024, engine.max_model_len - 2))
        else:
            reqs = sample_random(num_prompts, input_len, output_len or 128, engine.model_config.vocab_size, seed)
            if input_len + (output_len or 128) > engine.max_model_len:
                fail(f"--input-len + --output-len must fit max_model_len={engine.max_model_len}")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if backend == "glake":
        from glakeserve.distributed.workers import TensorParallelError

        try:
            res = B.run_glake(llm, reqs, console)
        except TensorParallelError as e:
            llm.close()
            fail(str(e), code=1)
    else:
        res = B.run_hf(_hf_model(engine), reqs, hf_batch_size, engine.eos_token_ids[0] if engine.eos_token_ids else 0,
                       console)
    B.report(res, console)
    stats = engine.stats()
    config = {k: v for k, v in kwargs.items()} | {
        "model": engine.model_name, "dtype": stats["dtype"], "max_model_len": engine.max_model_len,
        "dataset": dataset, "dataset_path": str(dataset_path) if dataset_path else None, "num_prompts": num_prompts,
        "input_len": input_len if dataset == "random" else None, "output_len": output_len,
        "prompt_lens": B.length_summary([r.prompt_len for r in reqs]),
        "output_lens": B.length_summary([r.output_len for r in reqs]),
        "backend": backend, "device": stats["device"], "kv_layout": kv_layout, "attention": stats["attention"]}
    try:
        if output_json:
            B.write_json(str(output_json), res, config)
            console.print(f"[dim]figures and timeline written to {output_json}[/dim]")
        if plot:
            B.plot(str(plot), res)
            console.print(f"[dim]plot written to {plot}[/dim]")
    except (OSError, ValueError) as e:
        fail(f"the run finished (figures above) but its output could not be written: {e}", code=1)


def _hf_model(engine):
    """HF transformers' Llama on the same weights (or the same random shape) as the engine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if engine.source.path is not None:
        return LlamaForCausalLM.from_pretrained(engine.source.path, dtype=engine.dtype).to(engine.device).eval()
    cfg = LlamaConfig(**{k: v for k, v in engine.model_config.to_hf_dict().items()
                         if k not in ("architectures", "model_type")})
    with torch.device(engine.device):
        return LlamaForCausalLM(cfg).to(engine.dtype).eval()


@app.command("inspect-memory")
def inspect_memory(
    url: Annotated[Optional[str], typer.Option(help="A running `glake serve`, e.g. http://127.0.0.1:8000.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="GLAKE_API_KEY", help="The server's API key, if it has one (as `glake serve` takes it).")] = None,
    watch: Annotated[Optional[float], typer.Option(help="Refresh every this many seconds (Ctrl-C stops).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON, for scripts.")] = False,
    set_limit: Annotated[Optional[str], typer.Option(
        help="With --url: change how far the server's KV pool may grow (e.g. 8GiB).")] = None,
    model: O.Model = None, device: O.Device = "auto", load_format: O.LoadFormat = "auto",
    kv_layout: O.KVLayout = "token-major", tensor_parallel_size: O.TensorParallelSize = 1,
) -> None:
    """The KV allocator's state: pool totals, each slot's mapped and reserved pages, a page map.
    Without --url it runs a short demo workload on the engine."""
    from glakeserve.cli.inspect import DemoWorkload, fetch_snapshot, post_limit, show

    if watch is not None and watch <= 0:
        fail("--watch takes a positive number of seconds")
    if set_limit is not None:
        if not url:
            fail("--set-limit changes a running server: give its --url")
        limit = O.parse_memory(set_limit, option="--set-limit")
        if limit is None or limit <= 1:
            fail("--set-limit takes bytes, like 8GiB")
        try:
            result = post_limit(url, int(limit), api_key)
        except (ConnectionError, ValueError) as e:
            fail(str(e))
        console.print(f"KV pool limit: {result['max_bytes'] / 2**30:.2f} GiB ({result['max_pages']} pages); "
                      f"now {result['total_bytes'] / 2**30:.2f} GiB in {result['total_pages']} pages")
        if not as_json and watch is None:
            return
    if url:
        def get():
            try:
                return fetch_snapshot(url, api_key)
            except ConnectionError as e:
                fail(str(e))

        show(console, get, as_json, watch)
        return
    llm = make_llm(model=model, device=device, load_format=load_format, kv_layout=kv_layout, max_model_len=1024,
                   max_num_seqs=4, kv_cache_memory=128 << 20, tensor_parallel_size=tensor_parallel_size)
    demo = DemoWorkload(llm)
    show(console, demo.snapshot, as_json, watch, advance=lambda: demo.advance(4))


@app.command()
def serve(
    model: O.Model = None, dtype: O.Dtype = "auto", device: O.Device = "auto", max_model_len: O.MaxModelLen = None,
    max_num_seqs: O.MaxNumSeqs = None, max_num_batched_tokens: O.MaxBatchedTokens = None,
    kv_cache_memory: O.KVMemory = None, load_format: O.LoadFormat = "auto", kv_layout: O.KVLayout = "token-major",
    seed: O.Seed = 0,
    host: Annotated[str, typer.Option(
        help="Address to bind: 127.0.0.1 (the default) is this machine only; 0.0.0.0 every interface.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port (1-65535).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="GLAKE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ (/health and /metrics stay "
                                     "open, as in vLLM).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model name clients use.")] = None,
    kv_max_memory: O.KVMaxMemory = None,
    kv_idle_release: Annotated[float, typer.Option(
        help="Seconds with no request after which free KV pages go back to the device (0: never).")] = 60.0,
    no_prefix_caching: O.NoPrefixCaching = False,
    request_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds a request may take, queueing included; then it ends with finish_reason \"timeout\" and "
             "what it generated (default: no limit).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM or Ctrl-C: seconds running requests get to finish; then they end with "
                    "finish_reason \"shutdown\". A second signal exits at once.")] = 30.0,
    max_body_size: Annotated[str, typer.Option(help="Largest request body (e.g. 4MiB); larger ones get 413.")]
    = "4MiB",
    max_queued_prompt_chars: Annotated[int, typer.Option(
        min=1, help="Prompt characters waiting for the tokenizer, all requests together; a request beyond gets "
                    "429 (retry later).")] = 16_000_000,
    tensor_parallel_size: O.TensorParallelSize = 1,
    enforce_eager: O.EnforceEager = False, attention_backend: O.AttentionBackend = "auto",
) -> None:
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics and /v1/memory. A client that disconnects ends its request; SIGTERM drains it gracefully."""
    import uvicorn

    from glakeserve.server.api import ServerConfig, build_app
    from glakeserve.server.async_engine import AsyncEngine
    from glakeserve.server.lifecycle import GracefulServer, bind, is_loopback, say

    # every argument is checked, and the port bound, before the model loads
    if request_timeout is not None and request_timeout <= 0:
        fail(f"--request-timeout takes a positive number of seconds, got {request_timeout:g}")
    body_limit = O.parse_memory(max_body_size, "--max-body-size")
    if body_limit < 1024:
        fail(f"--max-body-size takes bytes like 4MiB (at least 1KiB), got {max_body_size!r}")
    kv_max = O.parse_memory(kv_max_memory, "--kv-max-memory")
    try:
        loopback = is_loopback(host)
        if not loopback and not api_key:
            err_console.print(f"[yellow]warning:[/yellow] {host} is reachable from other machines and there is no "
                              f"--api-key: anyone who reaches it can generate (/v1/memory/limit is refused). Set "
                              f"--api-key or GLAKE_API_KEY.")
        sock = bind(host, port)
    except ValueError as e:
        fail(str(e))
    try:
        llm = make_llm(**O.engine_kwargs(model, dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens,
                                         kv_cache_memory, load_format, kv_layout, seed),
                       kv_cache_max_memory=kv_max, enable_prefix_caching=not no_prefix_caching,
                       tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                       attention_backend=attention_backend)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    engine = AsyncEngine(llm.engine, idle_release_s=kv_idle_release)
    name = served_model_name or llm.engine.model_name
    api = build_app(engine, ServerConfig(served_model_name=name, api_key=api_key, max_body_size=int(body_limit),
                                         request_timeout=request_timeout,
                                         max_queued_prompt_chars=max_queued_prompt_chars, loopback_only=loopback))
    shown = f"[{host}]" if ":" in host else host
    console.print(f"[bold]glake serve[/bold] · {name} on http://{shown}:{port} "
                  f"({'API key required' if api_key else 'no API key'})")
    server = GracefulServer(uvicorn.Config(api, log_level="warning"), api.state, shutdown_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        api.state.close()
        engine.shutdown()
        llm.close()  # the pool now, and under tensor parallelism every rank's process
    if server.signalled_at is not None:
        say(f"stopped {time.monotonic() - server.signalled_at:.1f}s after the signal")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
