"""Batched decoding for the server: a bounded queue of completions, one worker thread.

The worker takes the oldest waiting completion plus every other waiting one that samples the
same way (greedy, or the same temperature and top-p), up to `max_batch`, and runs them together
through `generate_tokens` — the same prefill + `while_loop` program as `generate`. Shapes come
from fixed buckets (batch sizes, prompt lengths, new-token counts are powers of two), so a new
request never compiles anything once its bucket has been seen; unused batch rows are stopped
after their first token. Tokens reach each completion's `on_event` as they are decoded (from
the loop's host callback); the same callback stops rows whose completion was cancelled or
reached its own `max_tokens`, and the loop ends when no row is left.

Events passed to `on_event` (called on the worker thread; it must not block):
`("token", id)`, then `("end", "stop" | "length")` or `("error", message)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from minimind_jax.infer.generate import SamplingConfig, generate_tokens

MIN_PROMPT_BUCKET = 32
MIN_NEW_TOKEN_BUCKET = 16


class QueueFull(Exception):
    """The waiting queue holds `max_queue` completions already."""


class EngineStopped(Exception):
    """The engine is shutting down or its worker died."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Bounds of the batched decoder."""

    max_batch: int = 8  # completions decoded together
    max_queue: int = 64  # completions waiting for a batch; more are refused
    max_context: int = 1024  # prompt + new tokens of one completion
    batch_wait_s: float = 0.01  # how long an idle worker waits for more arrivals to batch
    seed: int = 0  # first sampling seed (one per batch, counting up)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.max_context < 2:
            raise ValueError(f"bad engine bounds: {self}")


def power_of_two_at_least(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= n (and >= floor), but at most `cap` (when cap >= n)."""
    bucket = floor
    while bucket < n:
        bucket *= 2
    return max(min(bucket, cap), n)


@dataclasses.dataclass(eq=False)
class Completion:
    """One chat completion: prompt ids, sampling (its max_new_tokens is the limit), sink."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    on_event: Callable[[tuple], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0
    finished: bool = False

    def cancel(self) -> None:
        """The reader went away: drop it from the queue or stop its row."""
        self.cancelled.set()

    @property
    def batch_key(self) -> tuple:
        s = self.sampling
        return ("greedy",) if s.greedy else ("sample", s.temperature, s.top_p, s.top_k)

    def finish(self, event: tuple) -> None:
        if not self.finished:
            self.finished = True
            self.on_event(event)


class BatchEngine:
    """Owns the params and the worker thread; `submit` is thread-safe."""

    def __init__(self, params, model_config, eos_id: int, pad_id: int,
                 config: EngineConfig = EngineConfig(), repetition_penalty: float = 1.0):
        self.params, self.model_config, self.config = params, model_config, config
        self.eos_id, self.pad_id, self.repetition_penalty = eos_id, pad_id, repetition_penalty
        self._waiting: deque[Completion] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._batch: list[Completion] = []
        self._seeds = itertools.count(config.seed)
        self.batches_run = 0
        self.largest_batch = 0
        self.tokens_generated = 0  # over all completions, EOS included
        self._worker = threading.Thread(target=self._work, name="minimind-decode", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ public
    def submit(self, completion: Completion) -> None:
        """Queue a completion; raises QueueFull or EngineStopped instead of waiting."""
        with self._lock:
            if self._stopping or not self._worker.is_alive():
                raise EngineStopped("the decoder is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(completion)
            self._lock.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._stopping

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new work, fail what waits, let the running batch finish."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify_all()
        for completion in waiting:
            completion.finish(("error", "the server is shutting down"))
        for completion in self._batch:
            completion.cancel()
        self._worker.join(timeout)

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._decode(batch)

    def _next_batch(self) -> list[Completion] | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
        time.sleep(self.config.batch_wait_s)  # let requests sent together arrive together
        with self._lock:
            live = [c for c in self._waiting if not c.cancelled.is_set()]
            if not live:
                self._waiting.clear()
                return []
            key = live[0].batch_key
            batch = [c for c in live if c.batch_key == key][:self.config.max_batch]
            chosen = set(map(id, batch))
            self._waiting = deque(c for c in live if id(c) not in chosen)
        return batch

    def _decode(self, batch: list[Completion]) -> None:
        cfg = self.config
        rows = power_of_two_at_least(len(batch), 1, cfg.max_batch)
        longest = max(len(c.prompt_ids) for c in batch)
        prompt_len = power_of_two_at_least(longest, MIN_PROMPT_BUCKET, cfg.max_context)
        new_tokens = power_of_two_at_least(max(c.sampling.max_new_tokens for c in batch),
                                           MIN_NEW_TOKEN_BUCKET, cfg.max_context)
        prompts = [c.prompt_ids for c in batch] + [[self.pad_id]] * (rows - len(batch))
        sampling = dataclasses.replace(batch[0].sampling, max_new_tokens=new_tokens,
                                       repetition_penalty=self.repetition_penalty)
        self._batch = batch
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            generate_tokens(self.params, self.model_config, prompts, sampling, self.eos_id,
                            next(self._seeds), on_tokens=self._on_tokens,
                            prompt_bucket=prompt_len)
        except Exception as err:  # a failed batch fails its requests, not the server
            for completion in batch:
                completion.finish(("error", f"decoding failed: {type(err).__name__}: {err}"))
        finally:
            self._batch = []
        for completion in batch:  # e.g. the loop's own new-token bound (not reached normally)
            completion.finish(("end", "length"))

    def _on_tokens(self, tokens_B: np.ndarray, done_B: np.ndarray) -> np.ndarray:
        """Host side of one decode step: hand out tokens, say which rows stop now.
        One bound method for every batch, so the compiled program is reused."""
        stop_B = np.zeros(len(tokens_B), bool)
        for row, (token, done) in enumerate(zip(tokens_B.tolist(), done_B.tolist(),
                                                strict=True)):
            if done:
                continue
            if row >= len(self._batch):
                stop_B[row] = True  # a padding row
                continue
            completion = self._batch[row]
            if completion.cancelled.is_set() or completion.finished:
                stop_B[row] = True
                continue
            completion.generated += 1
            self.tokens_generated += 1
            if token == self.eos_id:
                completion.finish(("end", "stop"))
                continue
            completion.on_event(("token", token))
            if completion.generated >= completion.sampling.max_new_tokens:
                completion.finish(("end", "length"))
                stop_B[row] = True
        return stop_B
