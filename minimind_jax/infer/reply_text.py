"""What a chat model's answer text holds besides the answer: a `<think>` block and
`<tool_call>` blocks, as minimind-3's chat template (upstream HEAD d65ef2c) writes them.

Pure string functions, shared by `generate`/`chat` (display) and `serve` (OpenAI's
`tool_calls`). The rules follow minimind-3's server (`scripts/serve_openai_api.py`), except that a
`<tool_call>` block whose body is not a JSON object with a string `name` stays in the text
instead of vanishing.
"""

from __future__ import annotations

import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE) + r"\s*",
                          re.DOTALL)
_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.DOTALL)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer). A whole `<think>…</think>` block is taken out; without
    one, text before a lone `</think>` is the reasoning (the generation prompt opened the
    block when thinking is on)."""
    match = _THINK_BLOCK.search(text)
    if match:
        return match.group(1).strip(), (text[:match.start()] + text[match.end():]).strip()
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.replace(THINK_OPEN, "").strip(), answer.strip()
    return None, text


def _tool_call(body: str) -> dict | None:
    """{"name", "arguments" (a JSON string)} from a block's body, or None when malformed."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):  # OpenAI's `arguments` is JSON text
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"name": call["name"], "arguments": arguments}


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(text without the well-formed tool-call blocks, their calls in order). Malformed
    blocks stay in the text, so nothing the model wrote is lost."""
    calls, kept, end = [], [], 0
    for match in _TOOL_BLOCK.finditer(text):
        call = _tool_call(match.group(1).strip())
        if call is None:
            continue
        calls.append(call)
        kept.append(text[end:match.start()])
        end = match.end()
    kept.append(text[end:])
    return "".join(kept), calls


def split_opened_thinking(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, closed) of an answer whose prompt opened a `<think>` block: the
    reasoning runs to `</think>` (all of the text while it is still open); the answer follows
    without its leading newlines (as minimind-3's server streams it)."""
    reasoning, close, answer = text.partition(THINK_CLOSE)
    return reasoning, answer.lstrip("\n"), bool(close)


def safe_length(text: str, marker: str) -> int:
    """How much of a growing text can be released before `marker`: everything before its
    first occurrence, or before a tail that may yet become it."""
    start = text.find(marker)
    if start >= 0:
        return start
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return len(text) - size
    return len(text)
