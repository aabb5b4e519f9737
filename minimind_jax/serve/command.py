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
from minimind_jax.infer.infer_config import (
    LoadConfig,
    add_load_args,
    config_from_flags,
    field_default,
    field_flag,
)
from minimind_jax.model import flags as model_flags
from minimind_jax.serve.serve_config import EngineConfig, ServeConfig, ServeSettings


def _require_serve_packages() -> None:
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install -e '.[serve]'")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The `serve` flags read once into a ServeConfig (every bound checked, by the dataclasses,
    before anything is loaded)."""
    model_name = args.model_name or pathlib.Path(args.ckpt).resolve().name
    settings = config_from_flags(ServeSettings, args, model_name=model_name)
    engine = config_from_flags(EngineConfig, args, batch_wait_s=args.batch_wait_ms / 1000)
    return config_from_flags(ServeConfig, args, load=LoadConfig.from_args(args), engine=engine,
                             settings=settings)


def build_server_app(config: ServeConfig):
    """Load `config.load`'s tokenizer and model, start the decoder (and its warm-up, unless
    `config.warm_up` is off); return (app, settings)."""
    from minimind_jax.infer.generate import load_model, tokenizer_of

    tokenizer = tokenizer_of(config.load)
    params, model_config = load_model(config.load)
    app, engine = serve_model(config, params, model_config, tokenizer)
    if config.warm_up:
        warm_up_in_background(engine)
    return app, config.settings


def serve_model(config: ServeConfig, params, model_config, tokenizer):
    """(app, engine): the app serving these weights with `config`'s engine and settings (the
    engine runs from now on; the app stops it when it shuts down). `serve` and
    benchmarks/serve_bench.py build their server here."""
    from minimind_jax.serve.app import build_app
    from minimind_jax.serve.engine import BatchEngine

    engine = BatchEngine(params, model_config, tokenizer.eos_id, tokenizer.pad_id,
                         config.engine)
    return build_app(engine, tokenizer, config.settings), engine


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

    config = config_from_args(args)
    app, settings = build_server_app(config)
    where = f"http://{config.host}:{config.port}"
    print(f"serving {settings.model_name} at {where}/ (chat page) and {where}/v1 "
          f"(OpenAI API){'; API key required' if settings.api_key else ''}", file=sys.stderr)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("warning: reachable from other machines without --api_key", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
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
    where = f"http://{ServeConfig.host}:{ServeConfig.port}"
    p = subparsers.add_parser(
        "serve", formatter_class=model_flags.HelpFormatter,
        help="OpenAI-compatible chat server + web chat page (continuous batching)",
        description=__doc__ + "\nexample:\n  minimind-jax serve --ckpt out/full_sft_512\n"
                              f"  then open {where}/ or point an OpenAI client at {where}/v1")
    add_load_args(p, "our run or checkpoint folder, or reference weights (.pth, .safetensors, "
                     ".npz)")
    field_flag(p, ServeConfig, "host",
               "address to bind (0.0.0.0 = every interface; then set --api_key)")
    field_flag(p, ServeConfig, "port", "TCP port")
    field_flag(p, ServeSettings, "api_key", "require 'Authorization: Bearer KEY' on every route")
    p.add_argument("--model_name", default=None,
                   help="the model id /v1/models reports (default: the checkpoint's name)")
    _add_engine_flags(p)
    field_flag(p, ServeConfig, "warm_up",
               "compile each batch shape only when a request first needs it (the running "
               "requests wait for that); by default the programs of every common shape (decode "
               "steps, prefills, prompt chunks) are compiled in the background while serving, "
               "when no request is running, fewest rows and shortest lengths first; later "
               "starts load most of them from the compilation cache")
    _add_request_flags(p)
    field_flag(p, EngineConfig, "seed", "first sampling seed")
    field_flag(p, ServeConfig, "log_level", "uvicorn's log level",
               choices=("critical", "error", "warning", "info", "debug"))
    model_flags.add_model_args(p)
    p.set_defaults(func=run_serve, compile_cache=True)


def _add_engine_flags(p) -> None:
    """EngineConfig's flags (--seed comes later in --help)."""
    field_flag(p, EngineConfig, "max_batch",
               "slots: choices decoded at once (a request's n choices take n)")
    field_flag(p, EngineConfig, "max_queue",
               "choices waiting for a slot (a request's n choices count n); more are answered 429")
    p.add_argument("--batch_wait_ms", type=float,
                   default=field_default(EngineConfig, "batch_wait_s") * 1000,
                   help="how long an idle decoder waits for more requests to prefill together")
    field_flag(p, EngineConfig, "prefill_chunk",
               "a longer prompt is prefilled this many tokens per decode step, so the requests "
               "decoding meanwhile pause for a chunk, not the whole prompt")


def _add_request_flags(p) -> None:
    """ServeSettings' bounds and defaults of a request, and --max_context (EngineConfig's)."""
    field_flag(p, ServeSettings, "max_tokens_cap",
               "cap on a request's max_tokens (more is answered 400)", flag="max_tokens")
    field_flag(p, ServeSettings, "default_max_tokens", "max_tokens of requests that give none")
    field_flag(p, EngineConfig, "max_context", "prompt + max_tokens tokens allowed per request")
    for name, help_text in (
            ("temperature", "temperature of requests that give none"),
            ("top_p", "top_p of requests that give none"),
            ("top_k", "top-k for every request (0 = off)"),
            ("repetition_penalty",
             "Hugging Face-style repetition penalty of requests that give none (1 = off)"),
            ("system", "system prompt for conversations without one (default: the template's)")):
        field_flag(p, ServeSettings, name, help_text)
