"""Batches, the last stage of the data path: a seeded, shardable, resumable, prefetching loader
over a source of rows (`rows`). Next: `train_step.put_batch` puts a batch on the devices.

`Loader` orders rows by a pure function of (seed, epoch), so the position to checkpoint is just
(epoch, batch index), and it computes batches ahead in background threads (grain's thread-pool
prefetch over a MapDataset of batch indices).

Length buckets (`length_buckets` > 0): each batch's columns are cut to the smallest of a few
fixed widths (`bucket_widths`) that holds its last supervised position (or the last position
`loss_columns` says the loss reads), so a batch of short rows skips their trailing padding and
the step compiles once per width. Exact for losses that read only those positions of a causal
model (nothing before a position sees what follows it); not for the MoE aux loss, which averages
over every fed token.

Packed batches (`batch_packing`, with length buckets): instead of cutting the width, each batch's
rows are packed whole, as far as the loss reads them, into fewer rows of the same width (best fit
decreasing), the row count rounded up to one of `length_buckets` sizes (`row_buckets`). Each
packed row carries `segment_ids` (1, 2, ... per original row; 0 padding) and `positions`
(restarting at 0 per original row), so every token sees exactly what it saw in its own row;
`row_index` (the original row of each token, the row count for padding) and `row_real` (shaped
like the batch's rows: which are not loader padding) let a loss that needs per-row sums (DPO)
rebuild them. Same rows, order, masks and normalisation as the padded batch: exact per step for
the same losses as the cut.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np

from minimind_jax.data import torch_rng
from minimind_jax.data.packing import best_fit_rows
from minimind_jax.errors import UserError

PERMUTATIONS = ("numpy", "torch")


class Loader:
    """Global batches of `batch_size` rows in an order fixed by (seed, epoch); this process
    gets its contiguous `1/num_shards` slice of each. The last partial batch is kept and padded
    with zero-mask rows so each shard's row count divides by `pad_to_multiple`."""

    def __init__(self, source, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_shards: int = 1, shard_index: int = 0, pad_to_multiple: int = 1,
                 prefetch: int = 2, num_threads: int = 1, permutation: str = "numpy",
                 length_buckets: int = 0, loss_columns=None, batch_packing: bool = False,
                 packed_rows_multiple: int = 1):
        if len(source) == 0:
            raise UserError("the dataset has no samples")
        if batch_size < 1 or pad_to_multiple < 1 or num_shards < 1:
            raise UserError("batch_size, pad_to_multiple and num_shards must be positive")
        if batch_size % num_shards:
            raise UserError(f"batch_size {batch_size} must divide by the number of processes "
                            f"{num_shards}")
        if not 0 <= shard_index < num_shards:
            raise UserError(f"shard_index {shard_index} is not in [0, {num_shards})")
        if permutation not in PERMUTATIONS:
            raise UserError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        self.permutation = permutation
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.pad_to_multiple = pad_to_multiple
        self.prefetch = prefetch
        self.num_threads = num_threads
        if length_buckets < 0:
            raise UserError(f"--length_buckets must be 0 (off) or positive, got {length_buckets}")
        self.length_buckets = length_buckets
        if batch_packing and num_shards > 1:
            raise UserError("packed batches need the whole batch in one process")
        self.batch_packing = batch_packing and length_buckets > 0
        self.packed_rows_multiple = packed_rows_multiple
        # (batch) -> [..., T] the positions the loss reads (default: the loss mask's)
        self.loss_columns = loss_columns or (lambda arrays: arrays["loss_mask"])

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of `epoch`: file order, or a permutation seeded by (seed, epoch): numpy's,
        or minimind-3's `torch.randperm` after `torch.manual_seed(seed + epoch)`."""
        if not self.shuffle:
            return np.arange(len(self.source))
        if self.permutation == "torch":
            return torch_rng.randperm(len(self.source), self.seed + epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(len(self.source))

    def local_rows(self, order: np.ndarray, batch: int) -> tuple[np.ndarray, int]:
        """(row ids of this shard's slice of global batch `batch`, zero rows to append)."""
        rows = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        unit = self.num_shards * self.pad_to_multiple
        per_shard = math.ceil(len(rows) / unit) * unit // self.num_shards
        begin = self.shard_index * per_shard
        mine = rows[begin:begin + per_shard]
        return mine, per_shard - len(mine)

    def _batch(self, order: np.ndarray, source, batch: int) -> dict[str, np.ndarray]:
        rows, n_padding = self.local_rows(order, batch)
        arrays = source.get_batch(rows)
        if n_padding:
            arrays = {k: np.concatenate([v, np.zeros((n_padding, *v.shape[1:]), v.dtype)])
                      for k, v in arrays.items()}
        if not self.length_buckets:
            return arrays
        if self.batch_packing:
            return pack_batch(arrays, row_extents(self.loss_columns(arrays)),
                              self.length_buckets, self.packed_rows_multiple)
        extent = supervised_extent(self.loss_columns(arrays))
        if self.num_shards > 1:  # every process must feed the same width: the global batch's
            whole = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            extent = supervised_extent(self.loss_columns(source.get_batch(whole)))
        width = bucket_width(arrays["loss_mask"].shape[-1], self.length_buckets, extent)
        return {k: v[..., :width] for k, v in arrays.items()}

    def bucketed_fill(self, lengths: np.ndarray, width: int, epoch: int = 0) -> float:
        """Share of the fed slots that `lengths` (tokens per row, [N] or [N, sides]) fill in
        `epoch`'s batches: each cut to the bucket of its longest row, or packed."""
        lengths = np.minimum(lengths.reshape(len(lengths), -1), width)
        order, fed = self.order(epoch), 0
        for batch in range(self.batches_per_epoch):
            rows = lengths[order[batch * self.batch_size:(batch + 1) * self.batch_size]]
            if self.batch_packing:
                n_rows = self.batch_size * rows.shape[1]
                fed += width * packed_row_count(rows.ravel(), width, n_rows,
                                                self.length_buckets, self.packed_rows_multiple)
            else:
                fed += rows.size * bucket_width(width, self.length_buckets, int(rows.max()))
        return float(lengths.sum()) / fed

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This shard's batches of `epoch`, from global batch `start_batch` on."""
        import grain

        if not 0 <= start_batch <= self.batches_per_epoch:
            raise UserError(f"start batch {start_batch} is outside epoch of "
                            f"{self.batches_per_epoch} batches")
        order = self.order(epoch)
        for_epoch = getattr(self.source, "for_epoch", None)
        source = for_epoch(epoch, order) if for_epoch else self.source
        batches = grain.MapDataset.range(start_batch, self.batches_per_epoch).map(
            functools.partial(self._batch, order, source))
        threads = self.num_threads if self.prefetch > 0 else 0
        return iter(batches.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(self.prefetch, 0))))


def bucket_widths(width: int, n: int) -> list[int]:
    """The `n` row widths of `width`-wide rows: width / 2**k for k = n-1 ... 0, rounded up to a
    multiple of 16 (whole tiles for the attention kernels), the last = `width`."""
    return sorted({min(width, 16 * math.ceil(width / 2**k / 16)) for k in range(n)})


def supervised_extent(mask: np.ndarray) -> int:
    """Columns up to and including the last one any row supervises (0 when none does)."""
    used = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    return int(used[-1]) + 1 if len(used) else 0


def bucket_width(width: int, n: int, extent: int) -> int:
    """The smallest of the `n` bucket widths of `width`-wide rows that holds `extent` columns."""
    return next(w for w in bucket_widths(width, n) if w >= extent)


def row_extents(columns: np.ndarray) -> np.ndarray:
    """Per row of `columns` ([..., T] bool: the positions a loss reads), the columns up to and
    including its last such position ([...]; 0 for a row without any)."""
    width = columns.shape[-1]
    last = width - 1 - np.argmax(columns[..., ::-1], axis=-1)
    return np.where(columns.any(axis=-1), last + 1, 0)


def row_buckets(n_rows: int, n: int, multiple: int = 1) -> list[int]:
    """The `n` row counts a batch of `n_rows` rows is packed into: n_rows * k / n (k = 1..n),
    rounded up to a multiple of `multiple` (the devices the rows are split over)."""
    up = lambda x: multiple * math.ceil(x / multiple)  # noqa: E731
    return sorted({up(math.ceil(n_rows * k / n)) for k in range(1, n + 1)})


def row_bucket(needed: int, n_rows: int, n: int, multiple: int = 1) -> int:
    """The smallest `row_buckets` size that holds `needed` packed rows."""
    return next(r for r in row_buckets(n_rows, n, multiple) if r >= needed)


def packed_row_count(extents: np.ndarray, width: int, n_rows: int, n: int,
                     multiple: int = 1) -> int:
    """How many `width`-wide rows a batch of rows of these `extents` is packed into: its best-fit
    rows, rounded up to a `row_buckets` size."""
    return row_bucket(len(best_fit_rows(extents[extents > 0].tolist(), width)), n_rows, n,
                      multiple)


def pack_batch(arrays: dict[str, np.ndarray], extents: np.ndarray, n: int,
               multiple: int = 1) -> dict[str, np.ndarray]:
    """`arrays` (each [..., T], the same leading shape) with their rows packed into
    `packed_row_count` rows of T: each row's first `extents` tokens, whole; see the module
    docstring for the keys added."""
    ids = arrays["input_ids"]
    lead, width = ids.shape[:-1], ids.shape[-1]
    n_rows = math.prod(lead)
    for key, value in arrays.items():
        if value.shape != ids.shape:
            raise ValueError(f"packing a batch: {key} is {value.shape}, input_ids {ids.shape}")
    rows = {k: v.reshape(n_rows, width) for k, v in arrays.items()}
    extents = extents.reshape(n_rows)
    placed = np.flatnonzero(extents > 0)
    bins = best_fit_rows(extents[placed].tolist(), width)
    count = row_bucket(len(bins), n_rows, n, multiple)
    packed = {k: np.zeros((count, width), v.dtype) for k, v in rows.items()}
    positions, segment_ids = (np.zeros((count, width), np.int32) for _ in range(2))
    row_index = np.full((count, width), n_rows, np.int32)
    for r, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(placed[members].tolist(), start=1):
            end = start + int(extents[i])
            for k, v in rows.items():
                packed[k][r, start:end] = v[i, :end - start]
            positions[r, start:end] = np.arange(end - start)
            segment_ids[r, start:end] = segment
            row_index[r, start:end] = i
            start = end
    real = np.any(ids.reshape(n_rows, width) != 0, axis=-1).reshape(lead)
    return packed | {"positions": positions, "segment_ids": segment_ids, "row_index": row_index,
                     "row_real": real}
