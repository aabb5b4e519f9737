"""minimind-3's (upstream HEAD d65ef2c) sample rules: its PretrainDataset and SFTDataset, exactly.

shared/SPEC3.md section 4. Pretrain: `[bos] + first (max_len - 2) tokens + [eos]`, right-padded
with 0; every 0 is a non-target. SFT: roles from the `role` field, minimind-3's chat template (the
tokenizer's own), and two random decisions per conversation drawn from Python's `random` in
minimind-3's order — a system prompt prepended with probability 0.2 (only if no message has
tools and the first is not a system message), and every empty think block removed with
probability 0.8 (only if the text has one). Labels cover each
`<|im_start|>assistant\\n ... <|im_end|>\\n` span.

For the token cache a conversation is stored as three id lists: the template's ids as is, the
ids with the empty think blocks removed (empty if it has none) and a one-element list if it
draws the system-prompt coin (else empty). The system block is a whole template turn ending in
`<|im_end|>\\n` and the conversation's text starts at a special token, so the ids of a drawn
variant are exactly `system block ids + stored ids`: nothing needs tokenizing per epoch.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import numpy as np

from minimind_jax.data.samples import (
    LineProblem,
    _json_type,
    conversation_turns,
)

SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
ADD_SYSTEM_RATIO = 0.2
KEEP_EMPTY_THINK_RATIO = 0.2
EMPTY_THINK = "<think>\n\n</think>\n\n"
MESSAGE_FIELDS = ("role", "content", "reasoning_content", "tools", "tool_calls")
SLOTS = 3  # cached id lists per conversation: as is, think-stripped, system-coin flag


def sft_messages(record) -> list[dict]:
    """A record's messages as minimind-3 reads them: the five string fields, missing -> None."""
    messages = []
    for i, turn in enumerate(conversation_turns(record)):
        for name in MESSAGE_FIELDS:
            value = turn.get(name)
            if value is not None and not isinstance(value, str):
                raise LineProblem(f"conversations[{i}].{name} must be a string, got "
                                  f"{_json_type(value)}")
        if not isinstance(turn.get("content"), str):
            raise LineProblem(f"conversations[{i}] is missing field 'content' (a string)")
        for name in ("tools", "tool_calls"):
            if turn.get(name):
                try:
                    json.loads(turn[name])
                except json.JSONDecodeError as err:
                    raise LineProblem(f"conversations[{i}].{name} is not valid JSON: "
                                      f"{err.msg}") from None
        messages.append({name: turn.get(name) for name in MESSAGE_FIELDS})
    return messages


def draws_system_prompt(messages: Sequence[dict]) -> bool:
    """Whether minimind-3 draws the system-prompt coin: no tools anywhere, first role not system."""
    return not any(m.get("tools") for m in messages) and messages[0].get("role") != "system"


def render(tokenizer, messages: Sequence[dict]) -> str:
    """minimind-3's `create_chat_prompt`: tools from a system message, tool_calls parsed from
    JSON."""
    tools = None
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "system" and message.get("tools"):
            tools = json.loads(message["tools"])
        if message.get("tool_calls") and isinstance(message["tool_calls"], str):
            message["tool_calls"] = json.loads(message["tool_calls"])
        rendered.append(message)
    return tokenizer.apply_chat_template(rendered, add_generation_prompt=False, tools=tools)


def system_block_ids(tokenizer) -> list[list[int]]:
    """Ids of the system turn minimind-3 prepends, for each of the 10 prompts."""
    texts = [render(tokenizer, [{"role": "system", "content": p}]) for p in SYSTEM_PROMPTS]
    return tokenizer.encode_batch(texts)


def sft_ids_batch(tokenizer, records: Sequence[list[dict]],
                   max_seq_len: int | None) -> list[list[int]]:
    """SLOTS id lists per conversation (see the module docstring), cut to `max_seq_len`."""
    texts = [render(tokenizer, messages) for messages in records]
    stripped = [t.replace(EMPTY_THINK, "") if EMPTY_THINK in t else "" for t in texts]
    ids = tokenizer.encode_batch(texts + stripped)
    n = len(texts)
    out = []
    for i, messages in enumerate(records):
        flag = [1] if draws_system_prompt(messages) else []
        out += [ids[i], ids[n + i] if stripped[i] else [], flag]
    return out if max_seq_len is None else [x[:max_seq_len] for x in out]


def pretrain_ids_batch(tokenizer, texts: Sequence[str],
                        max_seq_len: int | None) -> list[list[int]]:
    """`[bos] + tokens + [eos]` per text; cut by `pretrain_truncate`."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids = [[bos, *x, eos] for x in tokenizer.encode_batch([str(t) for t in texts])]
    return ids if max_seq_len is None else pretrain_truncate(ids, max_seq_len)


def pretrain_truncate(ids_lists: list[list[int]], max_seq_len: int) -> list[list[int]]:
    """minimind-3 keeps the first max_len - 2 text tokens and always the eos."""
    return [x if len(x) <= max_seq_len else x[:max_seq_len - 1] + x[-1:] for x in ids_lists]


def draw_variants(flags_system: np.ndarray, has_empty_think: np.ndarray, order: np.ndarray,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """minimind-3's draws for one epoch: `random.seed(seed)` then the items in `order`, each drawing
    `random() < 0.2` (+ `choice` of a prompt) if it draws the system coin, then
    `random() > 0.2` if it has an empty think block. -> (system prompt index or -1,
    think stripped 0/1), per item index."""
    rng = random.Random(seed)
    system_idx = np.full(len(flags_system), -1, np.int64)
    stripped = np.zeros(len(flags_system), np.int64)
    for item in np.asarray(order).tolist():
        if flags_system[item] and rng.random() < ADD_SYSTEM_RATIO:
            system_idx[item] = rng.choice(range(len(SYSTEM_PROMPTS)))
        if has_empty_think[item] and rng.random() > KEEP_EMPTY_THINK_RATIO:
            stripped[item] = 1
    return system_idx, stripped


def variant_ids(slots: Sequence[Sequence[int]], system_ids: Sequence[Sequence[int]],
                system_idx: int, stripped: bool) -> list[int]:
    """The ids of one drawn variant from a conversation's cached slots."""
    body = list(slots[1] if stripped else slots[0])
    return (list(system_ids[system_idx]) + body) if system_idx >= 0 else body


def sft_markers(tokenizer) -> tuple[list[int], list[int]]:
    """`<|im_start|>assistant\n` and `<|im_end|>\n`: the spans minimind-3 supervises."""
    return (tokenizer.encode(f"{tokenizer.bos_token}assistant\n"),
            tokenizer.encode(f"{tokenizer.eos_token}\n"))
