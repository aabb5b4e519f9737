"""Training samples built from the specs alone, apart from minimind_jax.data: MiniMind2's
PretrainDataset / SFTDataset items as ../shared/SPEC.md "Samples" states them, minimind-3's as
SPEC3.md section 4 does. Only a tokenizer (the `tokenizers` library on tokenizer.json, or
sentencepiece with its control pieces matched in text), jinja2 (minimind-3's chat template) and
numpy are used. The golden tests check these functions against the reference's own samples
(tests/fixtures/*_golden.npz); the other tests check the package's data path (token cache,
rows, eval) against them where no golden holds the sample (other lengths, tokenizers, data)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# SPEC "Tokenizer": MiniMind2's template puts this system turn first (its SFTDataset never
# passes a system message: roles go by position, the first turn is the user's).
MINIMIND2_SYSTEM = "你是 MiniMind，是一个有用的人工智能助手。"
# SPEC3 section 4, step 3: the empty reasoning block a draw may strip from the rendered text.
EMPTY_THINK = "<think>\n\n</think>\n\n"


class SpecTokenizer:
    """A tokenizer folder (tokenizer.json or tokenizer.model, with tokenizer_config.json) read
    without the package: `encode` adds no bos/eos and matches special-token strings in the text
    as their single ids (SPEC "Tokenizer", SPEC3 section 3)."""

    def __init__(self, path):
        path = Path(path)
        folder = path.parent if path.is_file() else path
        self.config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._encode = lambda text: hf.encode(text, add_special_tokens=False).ids
            self.id_of = hf.token_to_id
        else:
            import sentencepiece

            model = path if path.is_file() else folder / "tokenizer.model"
            sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
            specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                        if sp.is_control(i) or sp.is_unknown(i)}
            # longest first, so that no special string is matched by a shorter one inside it
            pattern = re.compile("|".join(
                re.escape(s) for s in sorted(specials, key=len, reverse=True)))

            def encode(text: str) -> list[int]:
                ids, done = [], 0
                for match in pattern.finditer(text):
                    ids += sp.encode(text[done:match.start()]) + [specials[match.group()]]
                    done = match.end()
                return ids + sp.encode(text[done:])

            self._encode, self.id_of = encode, sp.piece_to_id
        for name in ("bos_token", "eos_token", "pad_token"):
            setattr(self, name, self.config[name])
        self.bos_id, self.eos_id, self.pad_id = (
            self.id_of(self.config[name]) for name in ("bos_token", "eos_token", "pad_token"))

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))


def _padded(ids: Sequence[int], max_len: int, pad_id: int) -> np.ndarray:
    """The first `max_len` ids, right-padded with `pad_id` to exactly `max_len` (int64)."""
    ids = list(ids)[:max_len]
    return np.array(ids + [pad_id] * (max_len - len(ids)), np.int64)


def _find(ids: np.ndarray, pattern: list[int], start: int) -> int | None:
    """First position >= start where `pattern` begins in `ids` (all of it inside), or None."""
    for at in range(start, len(ids) - len(pattern) + 1):
        if ids[at:at + len(pattern)].tolist() == pattern:
            return at
    return None


# ------------------------------------------------------------------ MiniMind2 (SPEC.md)


def minimind2_chat_text(conversations: Sequence[dict]) -> str:
    """SPEC "Tokenizer": the system turn, then even turns as the user's (each followed by the
    assistant's header), odd turns as the assistant's; the `role` fields are not read."""
    text = f"<s>system\n{MINIMIND2_SYSTEM}</s>\n"
    for position, turn in enumerate(conversations):
        if position % 2 == 0:
            text += f"<s>user\n{turn['content']}</s>\n<s>assistant\n"
        else:
            text += f"{turn['content']}</s>\n"
    return text


def minimind2_pretrain_sample(tok: SpecTokenizer, text: str, max_seq_len: int):
    """SPEC "Samples", pretrain: (X, Y, loss_mask), int64 [max_seq_len - 1]."""
    ids = _padded(tok.encode(f"{tok.bos_token}{text}{tok.eos_token}"), max_seq_len, tok.pad_id)
    mask = (ids != tok.pad_id).astype(np.int64)
    return ids[:-1], ids[1:], mask[1:]


def minimind2_sft_sample(tok: SpecTokenizer, conversations: Sequence[dict], max_seq_len: int):
    """SPEC "Samples", SFT: (X, Y, loss_mask), int64 [max_seq_len - 1]. From each
    `<s>assistant` on, the positions after its first token through the token after the next
    `</s>` (or to the row's end) are supervised; the scan goes on after that `</s>`."""
    ids = _padded(tok.encode(minimind2_chat_text(conversations)), max_seq_len, tok.pad_id)
    opening = tok.encode(f"{tok.bos_token}assistant")
    closing = tok.encode(tok.eos_token)
    mask = np.zeros(max_seq_len, np.int64)
    at = _find(ids, opening, 0)
    while at is not None:
        start = at + len(opening)
        end = _find(ids, closing, start)
        stop = max_seq_len if end is None else min(end + len(closing) + 1, max_seq_len)
        mask[start + 1:stop] = 1
        if end is None:
            break
        at = _find(ids, opening, end + len(closing))
    return ids[:-1], ids[1:], mask[1:]


# ------------------------------------------------------------------ minimind-3 (SPEC3.md)


def render_chat_template(tok: SpecTokenizer, messages: list[dict], **extra) -> str:
    """The tokenizer_config.json chat template, rendered by jinja2 with the settings that
    transformers' apply_chat_template uses (trim_blocks, lstrip_blocks, a sandbox)."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(tok.config["chat_template"]).render(
        messages=messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
        pad_token=tok.pad_token, **extra)


def minimind3_pretrain_sample(tok: SpecTokenizer, text: str, max_seq_len: int):
    """SPEC3 section 4, PretrainDataset: (input_ids, labels), int64 [max_seq_len]; bos, the
    first max_seq_len - 2 tokens, eos; every pad id (0) in labels is -100."""
    ids = _padded([tok.bos_id, *tok.encode(str(text))[:max_seq_len - 2], tok.eos_id],
                  max_seq_len, tok.pad_id)
    return ids, np.where(ids == tok.pad_id, -100, ids)


def minimind3_sft_sample(tok: SpecTokenizer, record: dict, max_seq_len: int,
                         system_prompt: str | None = None, stripped: bool = False):
    """SPEC3 section 4, SFTDataset, for given draws (a drawn system prompt or None; whether
    the empty think blocks were stripped): (input_ids, labels), int64 [max_seq_len]. Only
    conversations without tools (as the fixtures')."""
    fields = ("role", "content", "reasoning_content", "tools", "tool_calls")
    messages = [{name: turn.get(name) for name in fields} for turn in record["conversations"]]
    assert not any(m["tools"] for m in messages), "tool conversations are not written here"
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = render_chat_template(tok, messages, add_generation_prompt=False)
    if stripped:
        text = text.replace(EMPTY_THINK, "")
    ids = _padded(tok.encode(text), max_seq_len, tok.pad_id)
    opening = tok.encode(f"{tok.bos_token}assistant\n")
    closing = tok.encode(f"{tok.eos_token}\n")
    labels = np.full(max_seq_len, -100, np.int64)
    at = _find(ids, opening, 0)
    while at is not None:
        start = at + len(opening)
        end = _find(ids, closing, start)
        stop = max_seq_len if end is None else min(end + len(closing), max_seq_len)
        labels[start:stop] = ids[start:stop]
        if end is None:
            break
        at = _find(ids, opening, end + len(closing))
    return ids, labels
