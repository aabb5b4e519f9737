"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app over a BatchEngine.

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream`), `GET
/v1/models`, `GET /health`, and `GET /` (the chat page, static HTML + JS from the package).
With an API key every route wants `Authorization: Bearer KEY` (browsers may send it as the
password of HTTP Basic auth instead, which they prompt for on `/`). Every failure is answered
as an OpenAI error object with its status; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind_jax.serve.chat_format import ChatFormat, ReplyStream, chat_format_for
from minimind_jax.serve.choices import Choice
from minimind_jax.serve.engine import BatchEngine, Completion, EngineStopped, QueueFull
from minimind_jax.serve.schema import (
    MAX_BODY_BYTES,
    ApiError,
    ChatRequest,
    parse_request,
)
from minimind_jax.serve.serve_config import ServeSettings


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status == 429:
        headers = {"Retry-After": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _key_checker(api_key: str | None):
    """A dependency that accepts `Bearer KEY`, or Basic auth whose password is KEY."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    return check


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: BatchEngine, tokenizer, settings: ServeSettings,
              chat_format: ChatFormat | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which it stops on shutdown); `settings.max_context`
    None is the engine's."""
    chat_format = chat_format or chat_format_for(tokenizer, settings.system)
    if settings.max_context is None:
        settings = dataclasses.replace(settings, max_context=engine.config.max_context)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="minimind-jax", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, dependencies=[Depends(_key_checker(settings.api_key))])
    page = resources.files("minimind_jax").joinpath("web/chat.html").read_text(encoding="utf-8")

    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> JSONResponse:
        return _health(engine, settings.model_name)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": 0, "owned_by": "minimind-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await _read_body(request))
        prompt_ids = chat_format.prompt_ids(chat)
        completions, events = _submit(engine, chat, prompt_ids, settings)
        stops = tuple([chat.stop] if isinstance(chat.stop, str) else chat.stop or [])
        choices = [Choice(i, completion, tokenizer, ReplyStream(chat_format, chat.thinking),
                          stops) for i, completion in enumerate(completions)]
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": settings.model_name}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _sse(meta, choices, events, len(prompt_ids), include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await _collect(request, choices, events):
            return JSONResponse({}, status_code=499)  # nobody is listening
        return {**meta, "object": "chat.completion",
                "choices": [{"index": c.index, "message": c.message, "logprobs": None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(len(prompt_ids), choices)}

    return app


def _health(engine: BatchEngine, model_name: str) -> JSONResponse:
    """/health: whether the decoder runs (else 503), its load, its counters and warm-up."""
    body = {"status": "ok" if engine.alive else "stopped", "model": model_name,
            "queued": engine.queued, "decoding": engine.active,
            "max_batch": engine.config.max_batch, "steps_run": engine.steps_run,
            "prefills_run": engine.prefills_run, "prompts_prefilled": engine.prompts_prefilled,
            "largest_batch": engine.largest_batch, "tokens_generated": engine.tokens_generated,
            "warming": engine.warming, "programs_warm": engine.programs_warm,
            "programs_total": engine.programs_total}
    return JSONResponse(body, status_code=200 if engine.alive else 503)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as the OpenAI-style JSON body (the chat page's 401 asks for a password)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        response = _error_response(err)
        if err.status == 401 and request.url.path == "/":
            response.headers["WWW-Authenticate"] = 'Basic realm="minimind-jax"'
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error_response(ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}").body(),
                            status_code=500)


async def _collect(request: Request, choices: list[Choice], events: asyncio.Queue) -> bool:
    """Run every choice to its end; False when the client went away first. The completions
    are cancelled on every way out."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, choices, events))
    try:
        while not all(c.done for c in choices):
            index, (kind, value) = await events.get()
            if index is None:
                return False
            if kind == "error":
                raise ApiError(503, value)
            choices[index].take((kind, value))
    finally:
        watcher.cancel()
        for choice in choices:
            choice.completion.cancel()
    return True


def _submit(engine: BatchEngine, chat: ChatRequest, prompt_ids: list[int],
            settings: ServeSettings) -> tuple[list[Completion], asyncio.Queue]:
    """Check the bounds, queue the request's `n` completions; their events arrive on the
    returned queue as (choice index, event)."""
    if len(prompt_ids) >= settings.max_context:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                            f"{settings.max_context}", param="messages",
                       code="context_length_exceeded")
    limit = chat.token_limit
    if limit is not None and limit > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens={limit} is above this server's cap of "
                            f"{settings.max_tokens_cap}", param="max_tokens")
    if chat.n > settings.max_n:
        raise ApiError(400, f"n={chat.n} is above this server's cap of {settings.max_n}",
                       param="n")
    room = settings.max_context - len(prompt_ids)
    if limit is not None and limit > room:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens={limit} "
                            f"exceed this model's context of {settings.max_context}",
                       param="max_tokens", code="context_length_exceeded")
    sampling = settings.sampling_for(limit or min(settings.default_max_tokens, room),
                                     temperature=chat.temperature, top_p=chat.top_p,
                                     repetition_penalty=chat.repetition_penalty)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(index: int):
        def on_event(event: tuple) -> None:
            # RuntimeError: the event loop has closed (shutdown), nobody is left to tell
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
        return on_event

    completions = [Completion(prompt_ids, sampling, sink(i),
                              seed=None if chat.seed is None else (chat.seed + i) % 2**32)
                   for i in range(chat.n)]
    try:
        engine.submit_all(completions)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy ({err}); retry later",
                       code="queue_full") from None
    except EngineStopped as err:
        raise ApiError(503, str(err), code="engine_stopped") from None
    return completions, events


async def _cancel_on_disconnect(request: Request, choices: list[Choice],
                                events: asyncio.Queue) -> None:
    """Wait for the client to hang up (the body is read already), then stop its work."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for choice in choices:
        choice.completion.cancel()
    events.put_nowait((None, ("end", "cancelled")))


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI's usage: the prompt once, the tokens every choice generated."""
    completion_tokens = sum(c.tokens_used for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(meta: dict, choices: list[Choice], events: asyncio.Queue, prompt_tokens: int,
               include_usage: bool):
    """The choices as OpenAI `chat.completion.chunk` events (each with its choice's index),
    then `data: [DONE]`. Starlette cancels this generator when the client hangs up; `finally`
    then frees their slots."""

    def chunk(index: int | None, delta: dict | None, finish: str | None = None,
              **extra) -> str:
        parts = [] if delta is None else [{"index": index, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]
        body = {**meta, "object": "chat.completion.chunk", "choices": parts, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for choice in choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        while not all(c.done for c in choices):
            index, (kind, value) = await events.get()
            if kind == "error":
                yield f"data: {json.dumps(ApiError(503, value).body())}\n\n"
                break
            choice = choices[index]
            was_done = choice.done
            for delta in choice.take((kind, value)):
                yield chunk(index, delta)
            if choice.done and not was_done:
                yield chunk(index, {}, choice.finish_reason)
        else:
            if include_usage:
                yield chunk(None, None, usage=_usage(prompt_tokens, choices))
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            choice.completion.cancel()
