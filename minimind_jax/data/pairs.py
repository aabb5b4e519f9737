"""DPO preference pairs: `{"chosen": [messages], "rejected": [messages]}` JSONL read as each
reference's DPODataset (docs/post_training_spec.md section 2.1), exactly.

Per side: the tokenizer's chat template over the messages (roles from the `role` field, in both
generations), minimind-3 only: every empty think block removed with probability 0.8, drawn from
`random.Random(seed + epoch)` item by item in the epoch's order, chosen before rejected; then the
first `max_seq_len` token ids, right-padded with the pad id; the loss mask of the assistant spans
(MiniMind2: after `<s>assistant` to `</s>` + 1, shifted; minimind-3: `<|im_start|>assistant\\n`
... `<|im_end|>\\n`, unshifted); finally `x = ids[:-1]`, `y = ids[1:]`, `mask = mask[1:]`.

A batch of b pairs is a dict of [b, 2, max_seq_len - 1] arrays (`input_ids`, `labels`,
`loss_mask`; [:, 0] chosen, [:, 1] rejected), so a pair stays on one device and the loader's
zero padding rows are whole zero pairs (no real pair is all zeros: its ids start with a bos).
"""

from __future__ import annotations

import random

import numpy as np

from minimind_jax.data import minimind3
from minimind_jax.data.samples import (
    LineProblem,
    SkipReport,
    _json_type,
    iter_jsonl_chunks,
    pad_rows,
    sft_loss_mask,
    sft_mask_markers,
    shift,
)

SIDES = ("chosen", "rejected")


def _messages(record: dict, side: str) -> list[dict]:
    if side not in record:
        raise LineProblem(f"missing field '{side}' (a list of {{\"role\", \"content\"}} "
                          "messages)")
    messages = record[side]
    if not isinstance(messages, list):
        raise LineProblem(f"field '{side}' must be a list of messages, got "
                          f"{_json_type(messages)}")
    if not messages:
        raise LineProblem(f"field '{side}' is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineProblem(f"{side}[{i}] must be an object, got {_json_type(message)}")
        for name in ("role", "content"):
            if not isinstance(message.get(name), str):
                raise LineProblem(f"{side}[{i}].{name} must be a string, got "
                                  f"{_json_type(message.get(name))}"
                                  if name in message else f"{side}[{i}] is missing field "
                                                          f"'{name}'")
    if not any(m["role"] == "assistant" for m in messages):
        raise LineProblem(f"field '{side}' has no assistant reply (nothing to prefer)")
    return messages


def pair_record(record) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) messages of a DPO record, or LineProblem."""
    if not isinstance(record, dict):
        raise LineProblem(f"expected a JSON object with 'chosen' and 'rejected' fields, got "
                          f"{_json_type(record)}")
    return _messages(record, "chosen"), _messages(record, "rejected")


class PairSource:
    """The pairs of a JSONL file, tokenized once (both think variants for minimind-3)."""

    def __init__(self, path, tokenizer, max_seq_len: int, *, rules: str = "minimind2",
                 seed: int = 42, randomize: bool = True, skip_bad_lines: bool = False,
                 log=print):
        self.max_seq_len = max_seq_len
        self.rules = rules
        self.seed = seed
        self.randomize = randomize and rules == "minimind3"
        self.pad_id = tokenizer.pad_id
        if rules == "minimind3":
            self.markers, self.offset = minimind3.sft_markers(tokenizer), 0
        else:
            self.markers, self.offset = sft_mask_markers(tokenizer), 1
        skips = SkipReport(str(path))
        records = [r for chunk, _ in iter_jsonl_chunks(path, "sft", skip_bad_lines=skip_bad_lines,
                                                        skips=skips, read_record=pair_record)
                   for r in chunk]
        if skips.count:
            log(skips.summary())
        texts = [tokenizer.apply_chat_template(side, add_generation_prompt=False)
                 for pair in records for side in pair]  # chosen, rejected, chosen, ...
        think = minimind3.EMPTY_THINK
        stripped = [t.replace(think, "") if rules == "minimind3" and think in t else None
                    for t in texts]
        ids = tokenizer.encode_batch(texts + [t for t in stripped if t is not None])
        it = iter(ids[len(texts):])
        cut = lambda x: x[:max_seq_len]  # noqa: E731
        self.ids = [cut(x) for x in ids[:len(texts)]]  # [2N] lists: the texts as rendered
        self.stripped_ids = [cut(next(it)) if t is not None else None for t in stripped]
        self.has_think = np.array([t is not None for t in stripped]).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.ids) // 2

    @property
    def row_lengths(self) -> np.ndarray:
        """[N, 2] tokens of each pair's sides."""
        return np.array([len(x) for x in self.ids]).reshape(-1, 2)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.row_lengths.sum()) / (len(self.ids) * self.max_seq_len)

    def draws(self, epoch: int, order) -> np.ndarray:
        """[N, 2] think stripped per (pair, side) for `epoch`: minimind-3's
        `post_processing_chat`, one `random() > 0.2` per side that has an empty think block,
        in `order`, chosen before rejected."""
        stripped = np.zeros((len(self), 2), bool)
        if not self.randomize:
            return stripped
        rng = random.Random(self.seed + epoch)
        for item in np.asarray(order).tolist():
            for side in range(2):
                if self.has_think[item, side]:
                    stripped[item, side] = rng.random() > minimind3.KEEP_EMPTY_THINK_RATIO
        return stripped

    def for_epoch(self, epoch: int, order):
        return _DrawnPairs(self, self.draws(epoch, order))

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """Without an epoch: the draws of epoch 0 in file order."""
        return self.for_epoch(0, np.arange(len(self))).get_batch(indices)


class _DrawnPairs:
    """One epoch's view of a PairSource: its think-stripping draws fixed."""

    def __init__(self, source: PairSource, stripped: np.ndarray):
        self.source, self.stripped = source, stripped

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        src = self.source
        rows = []
        for i in np.asarray(indices).tolist():
            for side in range(2):
                k = 2 * i + side
                rows.append(src.stripped_ids[k] if self.stripped[i, side] else src.ids[k])
        ids = pad_rows(rows, src.max_seq_len, src.pad_id, np.int64)
        mask = np.stack([sft_loss_mask(row, *src.markers, offset=src.offset) for row in ids])
        x, y, m = shift(ids, mask)
        n = len(rows) // 2
        to_pairs = lambda a, dtype: a.reshape(n, 2, -1).astype(dtype)  # noqa: E731
        return {"input_ids": to_pairs(x, np.int32), "labels": to_pairs(y, np.int32),
                "loss_mask": to_pairs(m, np.float32)}
