"""The server's chat format: OpenAI messages -> prompt token ids through the tokenizer's chat
template, and the generated text -> an OpenAI assistant message or its streamed deltas.

`ChatFormat` knows no tools (MiniMind2's template); `ToolChatFormat` serves templates that
take `tools` (minimind-3's): the request's tools go to the template and the answer's
`<tool_call>` blocks come back as OpenAI `tool_calls`, as minimind-3's server returns them. A
request may open a think block (`open_thinking`, or `chat_template_kwargs` with `open_thinking` /
`enable_thinking`, as minimind-3's server reads them) when the template has that switch; the
reasoning then comes back as `reasoning_content`.
"""

from __future__ import annotations

import uuid

from minimind_jax.infer import reply_text
from minimind_jax.serve.schema import ApiError, ChatRequest, message_text


class ChatFormat:
    """Messages -> prompt ids, answer text -> assistant message (content only)."""

    supports_tools = False

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer, self.system = tokenizer, system
        self.supports_thinking = "open_thinking" in tokenizer.chat_template_variables

    def messages(self, request: ChatRequest) -> list[dict]:
        out = []
        for i, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            if (role == "tool" or message.tool_calls) and not self.supports_tools:
                raise ApiError(400, "this model's chat template has no tool messages",
                               param=f"messages.{i}")
            item = {"role": role, "content": message_text(message, i)}
            if message.tool_calls:
                item["tool_calls"] = message.tool_calls
            out.append(item)
        if self.system and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.system})
        return out

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        if request.tools and not self.supports_tools:
            raise ApiError(400, "this model's chat template does not support tools",
                           param="tools")
        if request.thinking and not self.supports_thinking:
            raise ApiError(400, "this model's chat template has no thinking switch",
                           param="open_thinking")
        from jinja2.exceptions import TemplateError

        extra = {"tools": request.tools} if request.tools else {}
        if request.thinking:
            extra["open_thinking"] = True
        try:
            text = self.tokenizer.apply_chat_template(self.messages(request),
                                                      add_generation_prompt=True, **extra)
        except TemplateError as err:  # e.g. a template that insists on a role order
            raise ApiError(400, f"the chat template rejects these messages: {err}",
                           param="messages") from None
        return self.tokenizer.encode(text)

    def reply(self, text: str, thinking: bool = False) -> tuple[dict, str | None]:
        """(assistant message, finish_reason override or None) for the whole answer."""
        reasoning, content = None, text
        if thinking:
            reasoning, content, _ = reply_text.split_opened_thinking(text)
        message, reason = self.answer_message(content)
        if reasoning is not None:
            message["reasoning_content"] = reasoning.strip()
        return message, reason

    def answer_message(self, content: str) -> tuple[dict, str | None]:
        return {"role": "assistant", "content": content}, None

    def streamable(self, content: str) -> int:
        """How much of the growing answer may be streamed as content already."""
        return len(content)

    def unstreamed_content(self, content: str, streamed: int) -> str:
        """The content still to stream once the answer is complete, `streamed` chars sent."""
        return content[streamed:]


class ToolChatFormat(ChatFormat):
    """A template that takes `tools`: the answer's well-formed
    `<tool_call>{"name", "arguments"}</tool_call>` blocks become OpenAI `tool_calls`
    (finish_reason "tool_calls"); malformed ones stay text. While streaming, the content from a
    `<tool_call>` on is held back until the answer ends."""

    supports_tools = True

    def answer_message(self, content: str) -> tuple[dict, str | None]:
        rest, calls = reply_text.parse_tool_calls(content)
        if not calls:
            return {"role": "assistant", "content": content}, None
        tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": call} for call in calls]
        return ({"role": "assistant", "content": rest.strip() or None,
                 "tool_calls": tool_calls}, "tool_calls")

    def streamable(self, content: str) -> int:
        return reply_text.safe_length(content, reply_text.TOOL_OPEN)

    def unstreamed_content(self, content: str, streamed: int) -> str:
        rest, calls = reply_text.parse_tool_calls(content)
        # the streamed part precedes the first <tool_call>, so it is a prefix of `rest`
        return rest[streamed:].strip() if calls else rest[streamed:]


def chat_format_for(tokenizer, system: str | None = None) -> ChatFormat:
    """`ToolChatFormat` when the tokenizer's chat template takes `tools`, else `ChatFormat`."""
    takes_tools = "tools" in tokenizer.chat_template_variables
    return (ToolChatFormat if takes_tools else ChatFormat)(tokenizer, system)


class ReplyStream:
    """One answer's OpenAI stream deltas as its text grows: `reasoning_content` until
    `</think>` when the prompt opened a think block, then `content` (what the format holds
    back, e.g. tool-call blocks, comes with `finish`)."""

    def __init__(self, chat_format: ChatFormat, thinking: bool):
        self.chat_format, self.thinking = chat_format, thinking
        self.sent_reasoning = self.sent_content = 0

    def _parts(self, text: str) -> tuple[str, str, bool]:
        if not self.thinking:
            return "", text, True
        return reply_text.split_opened_thinking(text)

    def deltas(self, text: str) -> list[dict]:
        """The deltas that `text` (the answer so far) makes ready to send."""
        reasoning, content, closed = self._parts(text)
        out = []
        ready = len(reasoning) if closed else reply_text.safe_length(reasoning,
                                                                      reply_text.THINK_CLOSE)
        if ready > self.sent_reasoning:
            out.append({"reasoning_content": reasoning[self.sent_reasoning:ready]})
            self.sent_reasoning = ready
        ready = self.chat_format.streamable(content) if closed else 0
        if ready > self.sent_content:
            out.append({"content": content[self.sent_content:ready]})
            self.sent_content = ready
        return out

    def finish(self, text: str) -> list[dict]:
        """The deltas still unsent once `text` is the whole answer."""
        reasoning, content, _ = self._parts(text)
        out = []
        if len(reasoning) > self.sent_reasoning:
            out.append({"reasoning_content": reasoning[self.sent_reasoning:]})
        rest = self.chat_format.unstreamed_content(content, self.sent_content)
        if rest:
            out.append({"content": rest})
        return out
