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

from minimind_jax.infer.generate import SamplingConfig
from minimind_jax.serve.chat_format import ChatFormat, ReplyStream, chat_format_for
from minimind_jax.serve.engine import BatchEngine, Completion, EngineStopped, QueueFull
from minimind_jax.serve.schema import (
    MAX_BODY_BYTES,
    ApiError,
    ChatRequest,
    parse_request,
)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the server allows and assumes when a request leaves a field out."""

    model_name: str = "minimind"
    api_key: str | None = None
    max_tokens_cap: int = 512  # a request asking for more is refused
    default_max_tokens: int = 256
    max_context: int = 1024  # prompt + max_tokens of one request
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 0
    system: str | None = None  # used when the messages carry no system message


class IncrementalDecoder:
    """Text of a growing token list (special tokens left out, as the references' servers
    stream it); None while it ends in an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, []

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> str | None:
        self.tokens.append(token)
        text = self.text()
        return None if text.endswith("\ufffd") else text


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
    """The FastAPI app serving `engine` (which it stops on shutdown)."""
    chat_format = chat_format or chat_format_for(tokenizer, settings.system)

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
        body = {"status": "ok" if engine.alive else "stopped", "model": settings.model_name,
                "queued": engine.queued, "max_batch": engine.config.max_batch,
                "batches_run": engine.batches_run, "largest_batch": engine.largest_batch,
                "tokens_generated": engine.tokens_generated}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": 0, "owned_by": "minimind-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await _read_body(request))
        prompt_ids = chat_format.prompt_ids(chat)
        completion, events = _submit(engine, chat, prompt_ids, settings)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": settings.model_name}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _sse(meta, completion, events, tokenizer,
                     ReplyStream(chat_format, chat.thinking), len(prompt_ids), include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        decoder, finish = await _collect(request, completion, events, tokenizer)
        if finish == "cancelled":
            return JSONResponse({}, status_code=499)  # nobody is listening
        message, reason = chat_format.reply(decoder.text(), chat.thinking)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": reason or finish}],
                "usage": _usage(len(prompt_ids), completion.generated)}

    return app


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


async def _collect(request: Request, completion: Completion, events: asyncio.Queue,
                   tokenizer) -> tuple[IncrementalDecoder, str]:
    """A whole (non-streamed) reply: its tokens and why it finished ("cancelled" when the
    client went away); the completion is cancelled on every way out."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, completion, events))
    try:
        decoder, finish = IncrementalDecoder(tokenizer), None
        while finish is None:
            kind, value = await events.get()
            if kind == "token":
                decoder.tokens.append(value)
            elif kind == "error":
                raise ApiError(503, value)
            else:
                finish = value
    finally:
        watcher.cancel()
        completion.cancel()
    return decoder, finish


def _submit(engine: BatchEngine, chat: ChatRequest, prompt_ids: list[int],
            settings: ServeSettings) -> tuple[Completion, asyncio.Queue]:
    """Check the bounds, queue the completion; its events arrive on the returned queue."""
    if len(prompt_ids) >= settings.max_context:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                            f"{settings.max_context}", param="messages",
                       code="context_length_exceeded")
    limit = chat.token_limit
    if limit is not None and limit > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens={limit} is above this server's cap of "
                            f"{settings.max_tokens_cap}", param="max_tokens")
    room = settings.max_context - len(prompt_ids)
    if limit is not None and limit > room:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens={limit} "
                            f"exceed this model's context of {settings.max_context}",
                       param="max_tokens", code="context_length_exceeded")
    limit = limit or min(settings.default_max_tokens, room)
    sampling = SamplingConfig(
        temperature=settings.temperature if chat.temperature is None else chat.temperature,
        top_p=settings.top_p if chat.top_p is None else chat.top_p, top_k=settings.top_k,
        max_new_tokens=limit)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def on_event(event: tuple) -> None:
        # RuntimeError: the event loop has closed (shutdown), nobody is left to tell
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, event)

    completion = Completion(prompt_ids, sampling, on_event)
    try:
        engine.submit(completion)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy ({err}); retry later",
                       code="queue_full") from None
    except EngineStopped as err:
        raise ApiError(503, str(err), code="engine_stopped") from None
    return completion, events


async def _cancel_on_disconnect(request: Request, completion: Completion,
                                events: asyncio.Queue) -> None:
    """Wait for the client to hang up (the body is read already), then stop its work."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    completion.cancel()
    events.put_nowait(("end", "cancelled"))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(meta: dict, completion: Completion, events: asyncio.Queue, tokenizer,
               stream: ReplyStream, prompt_tokens: int, include_usage: bool):
    """The completion as OpenAI `chat.completion.chunk` events, then `data: [DONE]`. Starlette
    cancels this generator when the client hangs up; `finally` then stops the row."""

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]
        body = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    decoder = IncrementalDecoder(tokenizer)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "token":
                text = decoder.push(value)
                for delta in stream.deltas(text) if text is not None else ():
                    yield chunk(delta)
                continue
            if kind == "error":
                yield f"data: {json.dumps(ApiError(503, value).body())}\n\n"
                break
            text = decoder.text()
            for delta in stream.finish(text):
                yield chunk(delta)
            message, reason = stream.chat_format.reply(text, stream.thinking)
            for index, call in enumerate(message.get("tool_calls") or []):
                yield chunk({"tool_calls": [{"index": index, **call}]})
            yield chunk({}, reason or value)
            if include_usage:
                yield chunk(None, usage=_usage(prompt_tokens, completion.generated))
            break
        yield "data: [DONE]\n\n"
    finally:
        completion.cancel()
