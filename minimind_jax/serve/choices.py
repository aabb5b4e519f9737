"""One choice of a chat completion as its tokens arrive: the text so far, the request's `stop`
sequences, what may be streamed yet, and the tokens it used.

A stop sequence ends the choice where it begins (the sequence itself is left out, as OpenAI
does), cancels the rest of its decoding, and gives finish_reason "stop". While streaming, a
tail of the text that may yet become a stop sequence is held back until it does or cannot.
`tokens_used` counts the tokens generated up to the end: those up to and including the one
that completed a stop sequence, the end-of-sequence token included when the model ended.
"""

from __future__ import annotations

from minimind_jax.infer.reply_text import safe_length
from minimind_jax.serve.chat_format import ReplyStream
from minimind_jax.serve.engine import Completion


class IncrementalDecoder:
    """Text of a growing token list (special tokens left out, as the references' servers
    stream it); None while it ends in an incomplete UTF-8 character.

    Each token costs a decode of a short window, not of the whole list: the window starts one
    released piece back, so whatever a tokenizer does at the start of a decode (SentencePiece
    drops a leading space) happens to both the window and the piece subtracted from it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, []
        self._released = ""  # text of tokens[:read_at]
        self._window_at = self._read_at = 0

    def _decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def text(self) -> str:
        return self._decode(self.tokens)

    def push(self, token: int) -> str | None:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._window_at:self._read_at])
        window = self._decode(self.tokens[self._window_at:])
        if window.endswith("\ufffd") or not window.startswith(before):
            return None
        self._released += window[len(before):]
        self._window_at, self._read_at = self._read_at, len(self.tokens)
        return self._released


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop sequence in `text` begins, or None."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


class Choice:
    """Feed it the engine's events with `take`; read `message`, `finish_reason`,
    `tokens_used` once `done`."""

    def __init__(self, index: int, completion: Completion, tokenizer, stream: ReplyStream,
                 stops: tuple[str, ...] = ()):
        self.index, self.completion, self.stream, self.stops = index, completion, stream, stops
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens_used = 0
        self.finish_reason: str | None = None
        self.message: dict | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, event: tuple) -> list[dict]:
        """The stream deltas this event makes ready (the last ones when it ends the choice).
        An ("error", message) event is the caller's to handle."""
        if self.done:
            return []  # e.g. tokens decoded after a stop sequence, before the cancel took
        kind, value = event
        if kind == "token":
            self.tokens_used += 1
            text = self.decoder.push(value)
            if text is None:
                return []
            cut = stop_at(text, self.stops)
            if cut is not None:
                self.completion.cancel()
                return self._end(text[:cut], "stop")
            ready = min([len(text)] + [safe_length(text, stop) for stop in self.stops])
            return self.stream.deltas(text[:ready])
        if value == "stop":
            self.tokens_used += 1  # the end-of-sequence token
        text = self.decoder.text()
        cut = stop_at(text, self.stops)
        return self._end(text, value) if cut is None else self._end(text[:cut], "stop")

    def _end(self, text: str, reason: str) -> list[dict]:
        deltas = self.stream.finish(text)
        self.message, override = self.stream.chat_format.reply(text, self.stream.thinking)
        self.finish_reason = override or reason
        for index, call in enumerate(self.message.get("tool_calls") or []):
            deltas.append({"tool_calls": [{"index": index, **call}]})
        return deltas
