"""Shape buckets for compiled programs: sizes rounded up so that many sizes share a program."""

from __future__ import annotations


def power_of_two_at_least(n: int, floor: int, cap: int | None = None) -> int:
    """The smallest power of two >= n (and >= floor), but at most `cap` (when cap >= n)."""
    bucket = floor
    while bucket < n:
        bucket *= 2
    return bucket if cap is None else max(min(bucket, cap), n)
