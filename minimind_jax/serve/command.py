"""`minimind-jax serve`: an OpenAI-compatible chat server and a web chat page for a model.

Requests join and leave the running decode batch at every token (continuous batching,
serve/engine.py); the HTTP side is FastAPI + uvicorn (serve/app.py), installed with
`pip install -e '.[serve]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import socket
import sys
import threading
import time

from minimind_jax.errors import UserError
from minimind_jax.model import flags as model_flags


def _require_serve_packages() -> None:
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install -e '.[serve]'")


def settings_from_args(args: argparse.Namespace, model_name: str):
    from minimind_jax.serve.app import ServeSettings

    problems = []
    if args.max_tokens < 1:
        problems.append(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if not 1 <= args.default_max_tokens <= args.max_tokens:
        problems.append(f"--default_max_tokens must be in [1, --max_tokens], got "
                        f"{args.default_max_tokens}")
    if args.max_context < 2:
        problems.append(f"--max_context must be >= 2, got {args.max_context}")
    if args.max_batch < 1 or args.max_queue < 1:
        problems.append("--max_batch and --max_queue must be >= 1")
    if args.prefill_chunk < 1:
        problems.append(f"--prefill_chunk must be >= 1, got {args.prefill_chunk}")
    if problems:
        raise UserError("; ".join(problems))
    return ServeSettings(model_name=model_name, api_key=args.api_key,
                         max_tokens_cap=args.max_tokens,
                         default_max_tokens=args.default_max_tokens,
                         max_context=args.max_context, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k,
                         repetition_penalty=args.repetition_penalty, system=args.system)


def build_server_app(args: argparse.Namespace):
    """Load tokenizer and model, start the decoder, return (app, settings)."""
    from minimind_jax.infer.generate import SamplingConfig, load_model, tokenizer_of
    from minimind_jax.infer.infer_config import LoadConfig
    from minimind_jax.serve.app import build_app
    from minimind_jax.serve.engine import BatchEngine, EngineConfig

    SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty)  # validates the defaults
    model_name = args.model_name or pathlib.Path(args.ckpt).resolve().name
    settings = settings_from_args(args, model_name)
    load = LoadConfig.from_args(args)
    tokenizer = tokenizer_of(load)
    params, config = load_model(load)
    engine = BatchEngine(params, config, tokenizer.eos_id, tokenizer.pad_id,
                         EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue,
                                      max_context=args.max_context,
                                      batch_wait_s=args.batch_wait_ms / 1000, seed=args.seed,
                                      prefill_chunk=args.prefill_chunk))
    if getattr(args, "warm_up", True):
        warm_up_in_background(engine)
    return build_app(engine, tokenizer, settings), settings


def warm_up_in_background(engine) -> None:
    """The engine's warm-up behind the serving, with a summary line when it is done."""
    started = time.monotonic()

    def done(count: int) -> None:
        print(f"warm-up: {count} programs compiled or loaded in "
              f"{time.monotonic() - started:.1f} s, serving meanwhile (every decode step, "
              "prefill and chunk shape of the common buckets)", file=sys.stderr, flush=True)

    print("warm-up: compiling in the background; requests are answered meanwhile (/health "
          "says how far it is)", file=sys.stderr)
    engine.start_warm_up(then=done)


def run_serve(args: argparse.Namespace) -> int:
    _require_serve_packages()
    import uvicorn

    app, settings = build_server_app(args)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {settings.model_name} at {where}/ (chat page) and {where}/v1 "
          f"(OpenAI API){'; API key required' if settings.api_key else ''}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("warning: reachable from other machines without --api_key", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60):
    """Serve `app` with uvicorn in a background thread (port 0: a free one); yields the base
    URL and stops the server on exit. For tests, benchmarks and notebooks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def register(subparsers) -> None:
    from minimind_jax.infer.infer_config import add_lora_weight_arg

    p = subparsers.add_parser(
        "serve", formatter_class=model_flags.HelpFormatter,
        help="OpenAI-compatible chat server + web chat page (continuous batching)",
        description=__doc__ + "\nexample:\n  minimind-jax serve --ckpt out/full_sft_512\n"
                              "  then open http://127.0.0.1:8998/ or point an OpenAI client at "
                              "http://127.0.0.1:8998/v1")
    p.add_argument("--ckpt", required=True,
                   help="our run or checkpoint folder, or reference weights (.pth, .safetensors,"
                        " .npz)")
    add_lora_weight_arg(p)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: one saved beside the checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 = every interface; then set --api_key)")
    p.add_argument("--port", type=int, default=8998, help="TCP port")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route")
    p.add_argument("--model_name", default=None,
                   help="the model id /v1/models reports (default: the checkpoint's name)")
    p.add_argument("--max_batch", type=int, default=8,
                   help="slots: choices decoded at once (a request's n choices take n)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="choices waiting for a slot (a request's n choices count n); more "
                        "are answered 429")
    p.add_argument("--batch_wait_ms", type=float, default=10.0,
                   help="how long an idle decoder waits for more requests to prefill together")
    p.add_argument("--prefill_chunk", type=int, default=256,
                   help="a longer prompt is prefilled this many tokens per decode step, so the "
                        "requests decoding meanwhile pause for a chunk, not the whole prompt")
    p.add_argument("--no_warm_up", dest="warm_up", action="store_false",
                   default=argparse.SUPPRESS,  # absent: warm up (no "default: True" in --help)
                   help="compile each batch shape only when a request first needs it (the "
                        "running requests wait for that); by default the programs of every "
                        "common shape (decode steps, prefills, prompt chunks) are compiled in "
                        "the background while serving, when no request is running, fewest "
                        "rows and shortest lengths first; later starts load most of them from "
                        "the compilation cache")
    p.add_argument("--max_tokens", type=int, default=512,
                   help="cap on a request's max_tokens (more is answered 400)")
    p.add_argument("--default_max_tokens", type=int, default=256,
                   help="max_tokens of requests that give none")
    p.add_argument("--max_context", type=int, default=1024,
                   help="prompt + max_tokens tokens allowed per request")
    p.add_argument("--temperature", type=float, default=0.85,
                   help="temperature of requests that give none")
    p.add_argument("--top_p", type=float, default=0.85, help="top_p of requests that give none")
    p.add_argument("--top_k", type=int, default=0, help="top-k for every request (0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="Hugging Face-style repetition penalty of requests that give none "
                        "(1 = off)")
    p.add_argument("--system", default=None,
                   help="system prompt for conversations without one (default: the template's)")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed")
    p.add_argument("--log_level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    model_flags.add_model_args(p)
    p.set_defaults(func=run_serve, compile_cache=True)
