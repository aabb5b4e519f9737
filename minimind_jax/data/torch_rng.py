"""`torch.randperm(n)` after `torch.manual_seed(seed)` on CPU, without torch
(shared/SPEC3.md section 5).

torch seeds its CPU generator's MT19937 with the standard 32-bit `init_genrand(seed)` (numpy's
legacy `RandomState(seed)` does the same) and, for n < 2**32 / 20, shuffles 0..n-1 in place:
for i = 0 .. n-2, swap r[i] with r[i + next32() % (n - i)].
"""

from __future__ import annotations

import numpy as np


def mt19937_uint32(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of MT19937 seeded with `init_genrand(seed)`."""
    # numpy's legacy generator: an int seed goes through init_genrand, and drawing the full
    # [0, 2**32) range as uint32 returns the raw outputs (mask 0xffffffff, no rejection).
    return np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=count,
                                                              dtype=np.uint32)


def randperm(n: int, seed: int) -> np.ndarray:
    """`torch.manual_seed(seed); torch.randperm(n)` as int64."""
    if n >= 2**32 // 20:
        raise ValueError("randperm is reproduced for n < 2**32 / 20 only (torch's small-n path)")
    bounds = np.arange(n, 1, -1, dtype=np.uint64)
    offsets = (mt19937_uint32(seed, max(n - 1, 0)).astype(np.uint64) % bounds).tolist()
    perm = list(range(n))
    for i, z in enumerate(offsets):  # inherently sequential; ~1 us per element
        j = i + z
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, np.int64)
