"""The OpenAI chat-completions request schema (the part this server honours), and its errors.

Requests are parsed strictly (a string where a number belongs is an error, not a conversion);
unknown fields are ignored, as clients send many. `ApiError` carries an HTTP status and renders
as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An error answered as JSON with `status` (never a traceback)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's and Hugging Face's name
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    open_thinking: bool = False  # minimind-3's server's switch, also read from chat_template_kwargs
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def thinking(self) -> bool:
        """Whether the prompt opens a think block (minimind-3's server reads these three)."""
        kwargs = self.chat_template_kwargs or {}
        return bool(self.open_thinking or kwargs.get("open_thinking")
                    or kwargs.get("enable_thinking"))

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(body: bytes) -> ChatRequest:
    """JSON bytes -> ChatRequest; malformed JSON is 400, a schema or type error 422."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}",
                           code="invalid_json") from None
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ApiError(422, f"{where}: {first['msg']}{more}", param=where or None,
                       code="invalid_type" if "type" in first["type"] else first["type"]
                       ) from None
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 4 or any(not stop for stop in stops):
        raise ApiError(400, "stop: up to 4 stop sequences, none of them empty", param="stop")
    return request


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a message: a string, or the text parts of a list joined."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages.{index}.content: only text parts are supported, "
                                f"got {part.type!r}", param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)
