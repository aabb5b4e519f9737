"""Which documents share a packed row: a pure function of the document lengths.

A packing is `(doc_order, row_starts)`: row r holds documents `doc_order[row_starts[r]:
row_starts[r + 1]]`, each whole (never split), their lengths summing to at most `capacity`.
Because it depends only on the cached lengths, every process computes the same rows, the row
count is known before training, and the loader's (seed, epoch) row order and (epoch, batch)
resume position work on packed rows as on unpacked ones.

Why not grain's `FirstFitPackIterDataset`/`BestFitPackIterDataset` (or MaxText, which uses
them): they pack a *stream*, so the rows of an epoch depend on the order the documents arrive
in, the row count is unknown until the stream ends, and resuming needs grain's iterator state;
our loader addresses rows by index (MapDataset) and checkpoints only (epoch, batch).
"""

from __future__ import annotations

import bisect

import numpy as np

DEFAULT_WINDOW = 8192  # documents per best-fit window: ~0.1% padding lost at each window's end


def next_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents in file order, a new row whenever the next one does not fit."""
    starts = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.arange(len(lengths), dtype=np.int64), np.asarray(starts, np.int64)


def _best_fit_window(lengths: list[int], first: int, capacity: int) -> list[list[int]]:
    """Best-fit decreasing over one window: longest document first, each into the open row
    whose free space it fills most tightly (a new row when none has room)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shortest = lengths[order[-1]]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: bisect finds the tightest fit
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            row, room = len(rows), capacity - n
            rows.append([first + i])
        else:
            room, row = free.pop(k)
            room -= n
            rows[row].append(first + i)
        if room >= shortest:  # rows nothing else can fill are dropped from the search
            bisect.insort(free, (room, row))
    return rows


def best_fit_rows(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing of `lengths` (each at most `capacity`) into rows: the indices of
    each row's documents in ascending order, rows in the order of their first document."""
    if len(lengths) == 0:
        return []
    return sorted(sorted(row) for row in _best_fit_window(list(lengths), 0, capacity))


def best_fit(lengths: np.ndarray, capacity: int,
             window: int = DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing over consecutive windows of `window` documents in file order.

    Rows list their documents in file order and come in the order of their first document,
    so an unshuffled epoch still walks the file roughly front to back.
    """
    if window < 1:
        raise ValueError(f"packing window must be positive, got {window}")
    if np.any(lengths > capacity):
        raise ValueError("a document is longer than the row capacity")
    rows: list[list[int]] = []
    values = lengths.tolist()
    for first in range(0, len(values), window):
        rows.extend(_best_fit_window(values[first:first + window], first, capacity))
    rows = sorted((sorted(row) for row in rows), key=lambda row: row[0])
    doc_order = np.fromiter((d for row in rows for d in row), np.int64, len(values))
    row_starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(row) for row in rows], out=row_starts[1:])
    return doc_order, row_starts


def pack(lengths: np.ndarray, capacity: int,
         window: int = DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """`best_fit` over windows of `window` documents; window 0 is the old `next_fit`."""
    return next_fit(lengths, capacity) if window == 0 else best_fit(lengths, capacity, window)


def fill_fraction(lengths: np.ndarray, row_starts: np.ndarray, capacity: int) -> float:
    """Share of the row slots holding tokens."""
    return float(lengths.sum()) / ((len(row_starts) - 1) * capacity)


def segments_and_positions(doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For documents of `doc_lengths` back to back in a row: each token's segment id (1, 2, ...
    by document; 0 is left for padding) and its position within its document."""
    doc_lengths = np.asarray(doc_lengths)
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    segments = np.repeat(np.arange(1, len(doc_lengths) + 1), doc_lengths)
    return segments, np.arange(int(doc_lengths.sum())) - starts
