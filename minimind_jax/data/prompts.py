"""RL prompts: minimind-3's RLAIFDataset (dataset/lm_dataset.py at d65ef2c, shared/SPEC_RL.md 1.1).

A line is `{"conversations": [{"role", "content"}, ..., {"role": "assistant", "content": ...}]}`;
the last message (the placeholder answer) is dropped and the rest rendered with minimind-3's
chat template and a generation prompt. Two random decisions per prompt, drawn from Python's
`random` seeded with seed + epoch in the epoch's order (as the script's `setup_seed(42 + epoch)`
before its DataLoader asks for the items): a system prompt prepended with probability 0.2
(unless a message has tools or the first is a system message; `random.choice` of
`minimind3.SYSTEM_PROMPTS`), then thinking opened with probability `thinking_ratio`.

A batch is the script's `tokenizer(prompts, padding=True, padding_side="left")` cut to
`max_seq_len` as its script cuts it (`truncation`): "columns", GRPO's, keeps the last
`max_seq_len` columns of the padded batch; "right", PPO's `truncation=True`, keeps each
prompt's first `max_seq_len` tokens (a long prompt loses its generation prompt). Its fields:
`input_ids` and `attention_mask` [b, P] (P the batch's longest, capped), `prompt_index` [b], and
the rendered `prompt_text` (an object array) the rewards read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from minimind_jax.data import minimind3
from minimind_jax.data.samples import (
    LineProblem,
    SkipReport,
    _json_type,
    conversation_turns,
    iter_jsonl_chunks,
)


def prompt_messages(record) -> list[dict]:
    """The messages of an RLAIF record (its keys as written), or LineProblem."""
    turns = conversation_turns(record)
    for i, turn in enumerate(turns):
        for name in ("role", "content"):
            if not isinstance(turn.get(name), str):
                raise LineProblem(f"conversations[{i}].{name} must be a string, got "
                                  f"{_json_type(turn.get(name))}")
    if len(turns) < 2:
        raise LineProblem("conversations has one message: the last one is the placeholder "
                          "answer, so the prompt is empty")
    return [dict(turn) for turn in turns]


class PromptSource:
    """The prompts of an RLAIF JSONL file, rendered per epoch with minimind-3's draws."""

    def __init__(self, path, tokenizer, max_seq_len: int, *, seed: int = 42,
                 thinking_ratio: float = 0.9, skip_bad_lines: bool = False, log=print,
                 truncation: str = "columns"):
        if truncation not in ("columns", "right"):
            raise ValueError(f"truncation must be 'columns' or 'right', got {truncation!r}")
        self.truncation = truncation
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.thinking_ratio = thinking_ratio
        skips = SkipReport(str(path))
        self.records = [r for chunk, _ in iter_jsonl_chunks(
            path, "sft", skip_bad_lines=skip_bad_lines, skips=skips, read_record=prompt_messages)
            for r in chunk]
        if skips.count:
            log(skips.summary())
        self.draws_system = np.array([minimind3.draws_system_prompt(m) for m in self.records])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def padding_fraction(self) -> float:
        return 0.0  # rows are made per batch, as wide as their longest prompt

    def draws(self, epoch: int, order) -> tuple[np.ndarray, np.ndarray]:
        """(system prompt index or -1, thinking opened) per prompt for `epoch`."""
        system = np.full(len(self), -1)
        thinking = np.zeros(len(self), bool)
        rng = random.Random(self.seed + epoch)
        choices = range(len(minimind3.SYSTEM_PROMPTS))
        for item in np.asarray(order).tolist():
            if self.draws_system[item] and rng.random() < minimind3.ADD_SYSTEM_RATIO:
                system[item] = rng.choice(choices)  # random.choice's one draw
            thinking[item] = rng.random() < self.thinking_ratio
        return system, thinking

    def render(self, item: int, system: int, thinking: bool) -> str:
        messages = self.records[item][:-1]
        if system >= 0:
            messages = [{"role": "system", "content": minimind3.SYSTEM_PROMPTS[system]},
                        *messages]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  open_thinking=bool(thinking))

    def for_epoch(self, epoch: int, order):
        return _DrawnPrompts(self, *self.draws(epoch, order))

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """Without an epoch: the draws of epoch 0 in file order."""
        return self.for_epoch(0, np.arange(len(self))).get_batch(indices)


def left_padded(ids_lists: Sequence[Sequence[int]], max_len: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [b, P] right-aligned to the longest list, then the last `max_len` columns."""
    width = max(len(ids) for ids in ids_lists)
    ids = np.full((len(ids_lists), width), pad_id, np.int32)
    mask = np.zeros((len(ids_lists), width), np.int32)
    for row, seq in enumerate(ids_lists):
        if len(seq):
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
    return ids[:, -max_len:], mask[:, -max_len:]


class _DrawnPrompts:
    """One epoch's view of a PromptSource: its draws fixed."""

    def __init__(self, source: PromptSource, system: np.ndarray, thinking: np.ndarray):
        self.source, self.system, self.thinking = source, system, thinking

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        src = self.source
        indices = np.asarray(indices, np.int64)
        texts = [src.render(i, self.system[i], self.thinking[i]) for i in indices.tolist()]
        encoded = src.tokenizer.encode_batch(texts)
        if src.truncation == "right":
            encoded = [ids[:src.max_seq_len] for ids in encoded]
        ids, mask = left_padded(encoded, src.max_seq_len, src.tokenizer.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "prompt_index": indices,
                "prompt_text": np.asarray(texts, dtype=object)}
