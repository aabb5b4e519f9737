"""Rows, the third stage of the data path: a token cache laid out as training rows, and
`open_source`, which opens a data file's rows, building its token cache on first use. Previous
stage: `token_cache`; next: `batches`.

A source of rows has `__len__()` and `get_batch(indices) -> dict` of [b, T] arrays, T =
max_seq_len - 1: `input_ids`, `labels` (int32), `loss_mask` (float32), plus `positions` and
`segment_ids` (int32) for packed rows. minimind-3 sources give T = max_seq_len (its trainer feeds
the whole row to the model and drops the last logit; the row's last position has no target), which
matters for the MoE aux loss (it averages over every fed token). A source with
`for_epoch(epoch, order)` gives the per-epoch view batches are taken from (minimind-3's SFT
draws).
"""

from __future__ import annotations

import numpy as np

from minimind_jax.data import minimind3, packing
from minimind_jax.data.samples import pad_rows, sft_loss_mask, shift
from minimind_jax.data.token_cache import TokenCache, prepare_token_cache
from minimind_jax.data.tokenizer import Tokenizer, load_tokenizer
from minimind_jax.errors import UserError


def _as_batch(ids_BL: np.ndarray, mask_BL: np.ndarray,
              full_rows: bool = False) -> dict[str, np.ndarray]:
    """Model inputs and next-token targets of padded rows whose `mask_BL` marks the supervised
    positions (unshifted). MiniMind2 feeds ids[:-1]; `full_rows` (minimind-3) feeds all ids
    and gives the last position no target."""
    x, y, m = shift(ids_BL, mask_BL)
    if full_rows:
        pad = np.zeros((len(ids_BL), 1), ids_BL.dtype)
        x, y, m = ids_BL, np.concatenate([y, pad], 1), np.concatenate([m, pad], 1)
    return {"input_ids": x.astype(np.int32), "labels": y.astype(np.int32),
            "loss_mask": m.astype(np.float32)}


class CachedSource:
    """One cached sample per row, right-padded to max_seq_len, masked as the reference does."""

    def __init__(self, cache: TokenCache, max_seq_len: int):
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.stage = cache.meta["stage"]
        self.pad_id = cache.meta["pad_id"]
        self.markers = (cache.meta["sft_start_ids"], cache.meta["sft_end_ids"])
        self.full_rows = cache.meta.get("rules", "minimind2") == "minimind3"

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def padding_fraction(self) -> float:
        """Share of the [N, max_seq_len] row slots that are padding."""
        return 1.0 - self.cache.meta["num_tokens"] / (len(self) * self.max_seq_len)

    @property
    def row_lengths(self) -> np.ndarray:
        """Tokens per row."""
        return np.minimum(self.cache.lengths, self.max_seq_len)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = pad_rows([self.cache.sample(i) for i in indices], self.max_seq_len,
                        self.pad_id, np.int32)
        if self.stage == "pretrain":
            mask = rows != self.pad_id
        else:
            mask = np.zeros(rows.shape, np.int64)
            for row, row_mask in zip(rows, mask, strict=True):
                row_mask[:] = sft_loss_mask(row, *self.markers)
        return _as_batch(rows, mask, self.full_rows)


class Minimind3SFTSource:
    """minimind-3 SFT conversations from a cache of `minimind3.SLOTS` id lists each; every epoch
    draws minimind-3's random variants (system prompt, think stripping) with `random.Random(seed +
    epoch)` in the epoch's order (`for_epoch`), or none with `randomize=False`."""

    def __init__(self, cache: TokenCache, max_seq_len: int, system_ids, *, seed: int,
                 randomize: bool = True):
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.pad_id = cache.meta["pad_id"]
        self.markers = (cache.meta["sft_start_ids"], cache.meta["sft_end_ids"])
        self.system_ids = system_ids
        self.seed = seed
        self.randomize = randomize
        lengths = cache.lengths.reshape(-1, minimind3.SLOTS)
        self.has_empty_think = lengths[:, 1] > 0
        self.draws_system = lengths[:, 2] > 0

    def __len__(self) -> int:
        return len(self.cache) // minimind3.SLOTS

    @property
    def row_lengths(self) -> np.ndarray:
        """Tokens per row, as cached (before the epoch's draws)."""
        lengths = self.cache.lengths.reshape(-1, minimind3.SLOTS)[:, 0]
        return np.minimum(lengths, self.max_seq_len)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.row_lengths.sum()) / (len(self) * self.max_seq_len)

    def draws(self, epoch: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(system prompt index or -1, think stripped) per conversation for `epoch`."""
        if not self.randomize:
            return np.full(len(self), -1), np.zeros(len(self), np.int64)
        return minimind3.draw_variants(self.draws_system, self.has_empty_think, order,
                                      self.seed + epoch)

    def variant(self, i: int, system_idx: int, stripped: bool) -> list[int]:
        """The ids of conversation `i`'s drawn variant, cut to max_seq_len."""
        slots = [self.cache.sample(minimind3.SLOTS * i + k) for k in range(2)]
        ids = minimind3.variant_ids(slots, self.system_ids, system_idx, stripped)
        return ids[:self.max_seq_len]

    def for_epoch(self, epoch: int, order: np.ndarray):
        system_idx, stripped = self.draws(epoch, order)
        return _DrawnSFT(self, system_idx, stripped)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Without an epoch: the draws of epoch 0 in file order."""
        return self.for_epoch(0, np.arange(len(self))).get_batch(indices)


class _DrawnSFT:
    """One epoch's view of a Minimind3SFTSource: its variants fixed."""

    def __init__(self, source: Minimind3SFTSource, system_idx: np.ndarray, stripped: np.ndarray):
        self.source, self.system_idx, self.stripped = source, system_idx, stripped

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        src = self.source
        ids_list = [src.variant(i, int(self.system_idx[i]), bool(self.stripped[i]))
                    for i in np.asarray(indices).tolist()]
        rows = pad_rows(ids_list, src.max_seq_len, src.pad_id, np.int32)
        mask = np.stack([sft_loss_mask(row, *src.markers, offset=0) for row in rows])
        return _as_batch(rows, mask, full_rows=True)


PACKABLE = ("pretrain", "sft")  # sample formats whose samples can share a row


def check_packable(stage: str, rules: str) -> None:
    """The rule of --pack, checked only here: pretrain documents or SFT conversations (each
    whole, its own loss mask); minimind-3's pretrain rows stay its dataset's."""
    if stage not in PACKABLE:
        raise UserError(f"--pack works with pretrain or SFT samples only, not {stage}")
    if rules != "minimind2" and stage == "pretrain":
        raise UserError("--pack works with MiniMind2's pretrain samples only (minimind-3's "
                        "pretrain rows are its dataset's)")


class PackedSource:
    """Samples, whole, packed into rows of max_seq_len tokens by `packing.pack` (best fit over
    windows of `window` samples; 0: next fit in file order): pretrain documents
    (`<s>`+text+`</s>`) or SFT conversations (chat template), each as cached (truncated to
    max_seq_len). Segment ids count samples 1, 2, ... within a row (0 = padding), positions
    restart at 0 per sample, and each sample's loss mask is its own, as unpacked (a document's
    every token after the first; a conversation's assistant replies, `sft_loss_mask` over its
    ids), so a label that would cross a sample boundary is never supervised and each sample
    gives exactly the targets it gives unpacked.

    minimind-3's SFT (`drawn`, its unpacked source): rows of max_seq_len fed whole, as its
    unpacked rows; each epoch's variants are drawn over the conversations in the order the
    epoch's rows hold them (`for_epoch`), and rows are packed by each conversation's longest
    variant (the longest system prompt added where it may be drawn), so every draw fits."""

    def __init__(self, cache: TokenCache, max_seq_len: int,
                 window: int = packing.DEFAULT_WINDOW, drawn: Minimind3SFTSource | None = None):
        self.stage = cache.meta["stage"]
        check_packable(self.stage, cache.meta.get("rules", "minimind2"))
        if window < 0:
            raise UserError(f"--pack_window must be 0 (next fit) or positive, got {window}")
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.pad_id = cache.meta["pad_id"]
        self.markers = (cache.meta["sft_start_ids"], cache.meta["sft_end_ids"])
        self.drawn = drawn
        if drawn is None:
            self.lengths = cache.lengths
        else:
            longest_system = max(map(len, drawn.system_ids)) if drawn.randomize else 0
            self.lengths = np.minimum(drawn.row_lengths + drawn.draws_system * longest_system,
                                      max_seq_len)
        self.doc_order, self.row_starts = packing.pack(self.lengths, max_seq_len, window)

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    @property
    def padding_fraction(self) -> float:
        """Share of the row slots that are padding (minimind-3: by the longest variants)."""
        return 1.0 - packing.fill_fraction(self.lengths, self.row_starts, self.max_seq_len)

    def documents(self, row: int) -> np.ndarray:
        """Ids of the samples in `row`, in the order they sit in it."""
        return self.doc_order[self.row_starts[row]:self.row_starts[row + 1]]

    def for_epoch(self, epoch: int, order: np.ndarray):
        """The rows of `epoch` (row `order`): minimind-3's draws made over the conversations
        in that order; MiniMind2's samples are the same every epoch."""
        if self.drawn is None:
            return self
        items = np.concatenate([self.documents(row) for row in np.asarray(order).tolist()])
        return _PackedView(self, *self.drawn.draws(epoch, items))

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Without an epoch: minimind-3's draws of epoch 0 in row order."""
        if self.drawn is not None:
            return self.for_epoch(0, np.arange(len(self))).get_batch(indices)
        return self.rows(indices, self.cache.sample)

    def _mask(self, ids_L: np.ndarray, positions_L: np.ndarray,
              doc_lengths: np.ndarray) -> np.ndarray:
        """The unshifted loss mask of one row's samples (`ids_L` etc. cut to their tokens)."""
        if self.stage == "pretrain":
            return (positions_L > 0) & (ids_L != self.pad_id)
        offset = 1 if self.drawn is None else 0  # as `sft_loss_mask` marks each's labels
        ends = np.cumsum(doc_lengths)
        return np.concatenate([sft_loss_mask(ids_L[end - n:end], *self.markers, offset=offset)
                               for n, end in zip(doc_lengths, ends, strict=True)])

    def rows(self, indices: np.ndarray, sample) -> dict[str, np.ndarray]:
        """The batch of packed rows `indices`, sample i's ids `sample(i)`."""
        shape = (len(indices), self.max_seq_len)
        ids, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        ids[:] = self.pad_id
        mask = np.zeros(shape, bool)
        for r, row in enumerate(np.asarray(indices).tolist()):
            samples = [sample(doc) for doc in self.documents(row)]
            doc_lengths = np.asarray([len(x) for x in samples], np.int64)
            n = int(doc_lengths.sum())
            segments[r, :n], positions[r, :n] = packing.segments_and_positions(doc_lengths)
            ids[r, :n] = np.concatenate(samples)
            mask[r, :n] = self._mask(ids[r, :n], positions[r, :n], doc_lengths)
        full_rows = self.drawn is not None
        batch = _as_batch(ids, mask, full_rows)
        width = batch["input_ids"].shape[1]  # max_seq_len, or - 1 (MiniMind2 feeds ids[:-1])
        batch["positions"] = positions[:, :width]
        batch["segment_ids"] = segments[:, :width]
        return batch


class _PackedView:
    """One epoch's view of a minimind-3 PackedSource: its conversations' variants fixed."""

    def __init__(self, source: PackedSource, system_idx: np.ndarray, stripped: np.ndarray):
        self.source, self.system_idx, self.stripped = source, system_idx, stripped

    def sample(self, i: int) -> list[int]:
        return self.source.drawn.variant(i, int(self.system_idx[i]), bool(self.stripped[i]))

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.source.rows(indices, self.sample)


def open_source(data_path, tokenizer_path, stage: str, max_seq_len: int, *, pack: bool = False,
                pack_window: int = packing.DEFAULT_WINDOW, cache_dir=None,
                skip_bad_lines: bool = False, force: bool = False,
                progress: bool | None = None, log=None, rules: str = "minimind2",
                sft_seed: int = 42, sft_random: bool = True):
    """A source over `data_path` (JSONL of `stage` "pretrain"/"sft"; `pack`: `PackedSource`),
    preparing its token cache on first use (progress bar) or reusing it. `tokenizer_path` may
    also be a loaded Tokenizer.
    `rules` "minimind3" gives minimind-3's samples; its SFT draws use `sft_seed + epoch` (or none
    without `sft_random`)."""
    if pack:
        check_packable(stage, rules)  # before the cache is built
    tokenizer = (tokenizer_path if isinstance(tokenizer_path, Tokenizer)
                 else load_tokenizer(tokenizer_path))
    cache = prepare_token_cache(data_path, tokenizer, stage, max_seq_len, cache_dir=cache_dir,
                                skip_bad_lines=skip_bad_lines, force=force, progress=progress,
                                log=log, rules=rules)
    drawn = None
    if rules == "minimind3" and stage == "sft":
        drawn = Minimind3SFTSource(cache, max_seq_len, minimind3.system_block_ids(tokenizer),
                                   seed=sft_seed, randomize=sft_random)
    if pack:
        return PackedSource(cache, max_seq_len, pack_window, drawn)
    return drawn or CachedSource(cache, max_seq_len)
