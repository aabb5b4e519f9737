"""Continuous batching for the server: requests join and leave the running decode batch at
token granularity.

The engine owns `max_batch` slots, each a row of one KV cache of `max_context` positions (the
cache keeps a next position per row). Its worker thread loops:

1. admit: waiting completions take the free slots, lowest first, as many as one prefill of
   at most `prefill_chunk` padded tokens holds (at least one); their prompts are prefilled
   together (one call, right-padded; newcomers with the same prompt, such as the `n` choices
   of one request, share one row of it) straight into their slots, and each gets its first
   token, sampled with its own seed. The next ones wait for the next loop, after a decode
   step of the rows already in. A prompt longer than `prefill_chunk` is fed one chunk per
   loop instead (after the cached part of its prompt; choices sharing the prompt share each
   chunk too), so the rows already decoding wait for a chunk between two of their tokens,
   never for a whole long prompt;
2. step: one decode step for every slot whose prompt is in: a request that arrived a moment
   ago decodes in the same step as one that is hundreds of tokens in;
3. hand the tokens out; a completion that ends (EOS, its own max_tokens, cancelled) frees its
   slot at once, for the next waiting one.

So a request waits for at most one decode step plus its prefill, never for the rest of a
batch. Shapes stay fixed per bucket: a decode step runs the lowest `rows` slots (1, or a power
of two >= 8 covering every occupied one) over the first `kv_len` cache positions (a power of
two >= 256 covering the longest); a prefill runs a power-of-two count of distinct prompts,
copied into a power-of-two count of newcomers, over a power-of-two prompt length; a chunk runs a
power-of-two count of distinct long-prompt chunks, copied into a power-of-two count of slots,
over `prefill_chunk` tokens and a power-of-two count of cached positions. Each bucket compiles
once. Every row samples with its own completion's settings (temperature, top-p, top-k and
repetition penalty) and its own random stream (seed, token count), so what a request draws
does not depend on its batch-mates.

Events passed to `on_event` (called on the worker thread; it must not block):
`("token", id)`, then `("end", "stop" | "length" | "cancelled")` or `("error", message)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.infer.buckets import power_of_two_at_least
from minimind_jax.infer.sampling import SamplingConfig, next_token_per_row
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import CACHE_SLOT_AXIS, MiniMind, cache_slots, init_cache
from minimind_jax.runtime.xla_flags import jit_for_decoding
from minimind_jax.serve.serve_config import EngineConfig

MIN_PROMPT_BUCKET = 32
# Fewer buckets, fewer programs to compile (about 2 s each on a 2-core CPU): a minimind2-small
# decode step of 8 rows took 15.2 ms over 64 or 128 cache positions, 15.7 ms over 256, 17.9
# over 512 and 22.6 over 1,024; 2 or 4 rows were slower than 8 (17-18 ms: XLA's dots of a few
# rows), one row 7 ms. So the cache lengths start at 256 and the row counts skip 2 and 4.
MIN_KV_BUCKET = 256
MIN_DECODE_ROWS = 8


class QueueFull(Exception):
    """The waiting queue holds `max_queue` completions already."""


class EngineStopped(Exception):
    """The engine is shutting down or its worker died."""


def decode_rows(n: int, cap: int) -> int:
    """The rows a decode step runs to cover the lowest n slots: 1, or a power of two >= 8."""
    return 1 if n == 1 else power_of_two_at_least(n, MIN_DECODE_ROWS, cap)


def buckets(floor: int, cap: int, sizes=None) -> list[int]:
    """The distinct `power_of_two_at_least(n, floor, cap)` of the sizes n (default 1..cap)."""
    sizes = range(1, cap + 1) if sizes is None else sizes
    return sorted({power_of_two_at_least(n, floor, cap) for n in sizes})


@dataclasses.dataclass(eq=False)
class Completion:
    """One completion: prompt ids, sampling (its max_new_tokens is the limit), seed (None: the
    engine's next), and the sink of its events."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    on_event: Callable[[tuple], None]
    seed: int | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0  # tokens made, EOS included
    finished: bool = False

    def cancel(self) -> None:
        """The reader went away: drop it from the queue or free its slot."""
        self.cancelled.set()

    def finish(self, event: tuple) -> None:
        if not self.finished:
            self.finished = True
            self.on_event(event)


# ---------------------------------------------------------------- the compiled programs
# Slots: B = max_batch rows of the engine's cache; R = the rows a decode step runs; A = the
# newcomers of one prefill, U their distinct prompts, P the padded prompt length. `rows`
# holds the per-row sampling settings ([B] arrays).


def _tokens_seen(ids_XT, valid_XT, vocab_size: int):
    """[X, V] bool: which tokens each row's valid ids hold (the repetition penalty's set)."""
    X = ids_XT.shape[0]
    return jnp.zeros((X, vocab_size), jnp.int32).at[jnp.arange(X)[:, None], ids_XT].add(
        valid_XT.astype(jnp.int32)) > 0


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache", "seen_BV"))
def _prefill(params, cache, seen_BV, ids_UP, lengths_U, source_A, slots_A, seeds_A, rows_A, *,
             config: ModelConfig):
    """Prefill the U distinct prompts once and copy each into the slots of the newcomers that
    share it (newcomer a reads prompt source_A[a]; a slot >= B: a padding row, dropped);
    returns (cache, seen_BV, first token of each newcomer, sampled with its own seed)."""
    U, P = ids_UP.shape
    valid_UP = jnp.arange(P)[None, :] < lengths_U[:, None]
    fresh = init_cache(config, U, P, dtype=cache["k"][0].dtype)
    logits_UPV, _, fresh = MiniMind(config).apply(
        {"params": params}, ids_UP, segment_ids=valid_UP.astype(jnp.int32), cache=fresh)
    last_UV = logits_UPV[jnp.arange(U), lengths_U - 1]
    seen_AV = _tokens_seen(ids_UP, valid_UP, config.vocab_size)[source_A]
    first_A = next_token_per_row(last_UV[source_A], seen_AV, seeds_A, jnp.zeros_like(seeds_A),
                                 rows_A)
    # slots past the prompt keep an earlier occupant's entries: the causal mask hides them
    # until this row's own decode steps overwrite them
    cache = {**{name: tuple(layer.at[cache_slots(name, slots_A, slice(None, P))].set(
                                new[source_A], mode="drop")
                            for layer, new in zip(cache[name], fresh[name], strict=True))
                for name in CACHE_SLOT_AXIS},
             "segment_ids": cache["segment_ids"].at[slots_A, :P].set(
                 fresh["segment_ids"][source_A], mode="drop"),
             "index": cache["index"].at[slots_A].set(lengths_U[source_A], mode="drop")}
    return cache, seen_BV.at[slots_A].set(seen_AV, mode="drop"), first_A


@functools.partial(jax.jit, static_argnames=("config", "kv_len"),
                   donate_argnames=("cache", "seen_BV"))
def _extend(params, cache, seen_BV, ids_UC, lengths_U, offset_U, reader_U, source_A, slots_A,
            seeds_A, rows_A, *, config: ModelConfig, kv_len: int):
    """One chunk of long prompts: feed each of the U distinct chunks its lengths_U tokens of
    ids_UC after the offset_U prompt tokens that slot reader_U's cache holds (within the first
    `kv_len` slots; a slot's index may still be an earlier occupant's when offset is 0), and
    store their keys and values in the slots that share it (slot slots_A[a] takes chunk
    source_A[a]; a slot >= B: a padding row, dropped). Returns (cache, seen_BV, the token each
    slot samples after its chunk with its own seed: its first token when the chunk ends its
    prompt)."""
    U, C = ids_UC.shape
    B = seen_BV.shape[0]
    read_U = jnp.minimum(reader_U, B - 1)
    view = {**{name: tuple(layer[cache_slots(name, read_U, slice(None, kv_len))]
                           for layer in cache[name]) for name in CACHE_SLOT_AXIS},
            "segment_ids": cache["segment_ids"][read_U, :kv_len], "index": offset_U}
    valid_UC = jnp.arange(C)[None, :] < lengths_U[:, None]
    position_UC = offset_U[:, None] + jnp.arange(C)[None, :]
    logits_UCV, _, new_LUKCH = MiniMind(config).apply(
        {"params": params}, ids_UC, positions=position_UC,
        segment_ids=valid_UC.astype(jnp.int32), cache=view, write_cache=False)
    seen_UV = (jnp.where(offset_U[:, None] == 0, False, seen_BV[read_U])
               | _tokens_seen(ids_UC, valid_UC, config.vocab_size))
    seen_AV = seen_UV[source_A]
    last_UV = logits_UCV[jnp.arange(U), lengths_U - 1]
    next_A = next_token_per_row(last_UV[source_A], seen_AV, seeds_A, jnp.zeros_like(seeds_A),
                                rows_A)
    # a chunk's padding goes past the cache's end: dropped
    at_AC = jnp.where(valid_UC, position_UC, cache["segment_ids"].shape[1])[source_A]
    cache = {**{name: tuple(layer.at[cache_slots(name, slots_A[:, None], at_AC)].set(
                                new.transpose(0, 2, 1, 3)[source_A], mode="drop")  # [A, C, K, H]
                            for layer, new in zip(cache[name], new_LUKCH[name], strict=True))
                for name in CACHE_SLOT_AXIS},
             "segment_ids": cache["segment_ids"].at[slots_A[:, None], at_AC].set(1, mode="drop"),
             "index": cache["index"].at[slots_A].set((offset_U + lengths_U)[source_A],
                                                     mode="drop")}
    return cache, seen_BV.at[slots_A].set(seen_AV, mode="drop"), next_A


@jit_for_decoding(static_argnames=("config", "rows", "kv_len"))
def _decode_step(params, cache, seen_BV, tokens_R, seeds_R, counts_R, rows_R, *,
                 config: ModelConfig, rows: int, kv_len: int):
    """Feed each of the first `rows` slots its last token, reading only the first `kv_len`
    positions (every occupied row's fit). Returns (next token of each, what `_store_step`
    writes back: the keys and values [L, R, K, H] each row wrote, its seen-token row).
    Only reading the cache here, and writing it in a program of its own, keeps XLA from
    copying the whole cache around the in-place update (that copy was 100 ms a step)."""
    index_R = cache["index"][:rows]
    view = {**{name: tuple(layer[cache_slots(name, slice(None, rows), slice(None, kv_len))]
                           for layer in cache[name]) for name in CACHE_SLOT_AXIS},
            "segment_ids": cache["segment_ids"][:rows, :kv_len], "index": index_R}
    seen_RV = seen_BV[:rows].at[jnp.arange(rows), tokens_R].set(True)
    logits_R1V, _, new_LRK1H = MiniMind(config).apply(
        {"params": params}, tokens_R[:, None], positions=index_R[:, None],
        segment_ids=jnp.ones((rows, 1), jnp.int32), cache=view, write_cache=False)
    next_R = next_token_per_row(logits_R1V[:, 0], seen_RV, seeds_R, counts_R, rows_R)
    written = {name: new_LRK1H[name][:, :, :, 0] for name in ("k", "v")}  # [L, R, K, H]
    return next_R, written, seen_RV


@functools.partial(jax.jit, donate_argnames=("cache", "seen_BV"))
def _store_step(cache, seen_BV, written, seen_RV, active_R):
    """Write a decode step's keys and values into the occupied rows' next slots (in place)."""
    rows = active_R.shape[0]
    row_R = jnp.arange(rows)
    index_R = cache["index"][:rows]
    at_R = jnp.where(active_R, index_R, cache["segment_ids"].shape[1])  # free rows: dropped
    cache = {**{name: tuple(layer.at[cache_slots(name, row_R, at_R)].set(written[name][i],
                                                                        mode="drop")
                            for i, layer in enumerate(cache[name]))
                for name in CACHE_SLOT_AXIS},
             "segment_ids": cache["segment_ids"].at[row_R, at_R].set(1, mode="drop"),
             "index": cache["index"].at[:rows].add(active_R.astype(jnp.int32))}
    # a row still prefilling keeps its own seen tokens (its last token is an earlier occupant's)
    return cache, seen_BV.at[:rows].set(jnp.where(active_R[:, None], seen_RV, seen_BV[:rows]))


class ProgramTable:
    """The engines' compiled programs by key, each compiled once by whichever thread asks for
    it first (the engine's worker for a request, or a warm-up thread); a thread asking for one
    that another is compiling waits for it. XLA compiles without the GIL, so threads compile
    side by side."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: dict[tuple, concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return sum(f.done() and f.exception() is None for f in list(self._futures.values()))

    def get(self, key: tuple, compile_program: Callable):
        with self._lock:
            future = self._futures.get(key)
            mine = future is None
            if mine:
                future = self._futures[key] = concurrent.futures.Future()
        if mine:
            try:
                future.set_result(compile_program())
            except BaseException as err:  # the next asker tries again
                with self._lock:
                    del self._futures[key]
                future.set_exception(err)
        return future.result()


PROGRAMS = ProgramTable()


def compilations() -> int:
    """Programs the engines of this process have compiled (or loaded) so far."""
    return len(PROGRAMS)


def _abstract(tree):
    """The shapes, dtypes and placements of a tree of arrays (what compiling needs of them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# ---------------------------------------------------------------- the engine


class SlotTable:
    """Host side of the slots: who occupies each, its next position and sampling settings."""

    def __init__(self, size: int):
        self.owner: list[Completion | None] = [None] * size
        self.last_token = np.zeros(size, np.int32)
        self.position = np.zeros(size, np.int32)  # the slot its next token is written to
        self.prefilled = np.zeros(size, np.int32)  # prompt tokens its cache holds so far
        self.seated_at = np.zeros(size, np.int64)  # order of arrival in the slots
        self._seatings = itertools.count()
        self.seed = np.zeros(size, np.uint32)
        self.settings = {"temperature": np.zeros(size, np.float32),
                         "top_p": np.ones(size, np.float32),
                         "top_k": np.zeros(size, np.int32),
                         "repetition_penalty": np.ones(size, np.float32)}

    def free(self) -> list[int]:
        return [slot for slot, owner in enumerate(self.owner) if owner is None]

    def occupied(self) -> list[int]:
        return [slot for slot, owner in enumerate(self.owner) if owner is not None]

    def prefilling(self) -> list[int]:
        """Occupied slots whose prompt is not all in the cache yet, earliest seated first."""
        return sorted((slot for slot in self.occupied()
                       if self.prefilled[slot] < len(self.owner[slot].prompt_ids)),
                      key=lambda slot: self.seated_at[slot])

    def decoding(self) -> list[int]:
        return [slot for slot in self.occupied()
                if self.prefilled[slot] == len(self.owner[slot].prompt_ids)]

    def seat(self, slot: int, completion: Completion, seed: int) -> None:
        s = completion.sampling
        self.owner[slot] = completion
        self.position[slot] = len(completion.prompt_ids)
        self.prefilled[slot] = 0
        self.seated_at[slot] = next(self._seatings)
        self.seed[slot] = seed
        for name, value in (("temperature", s.temperature), ("top_p", s.top_p),
                            ("top_k", s.top_k), ("repetition_penalty", s.repetition_penalty)):
            self.settings[name][slot] = value

    def rows(self, slots) -> dict:
        return {name: values[slots] for name, values in self.settings.items()}

    def padded(self, slots: list[int], n: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(slots_A, seeds_A, rows_A) of `slots` padded to n rows: a padding row's slot is out
        of range (the programs drop its writes) and it reads the last slot's settings."""
        slots_A = np.full(n, len(self.owner), np.int32)
        slots_A[:len(slots)] = slots
        read = np.minimum(slots_A, len(self.owner) - 1)
        return slots_A, self.seed[read], self.rows(read)


class BatchEngine:
    """Owns the params, the KV cache of the slots and the worker thread; `submit` is
    thread-safe."""

    def __init__(self, params, model_config: ModelConfig, eos_id: int, pad_id: int,
                 config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.params, self.model_config, self.config = params, model_config, config
        self.eos_id, self.pad_id = eos_id, pad_id
        self._waiting: deque[Completion] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._slots = SlotTable(config.max_batch)
        self._seeds = itertools.count(config.seed)
        self._cache = self._seen = None
        self._reset_device_state()
        self._shapes = _abstract((params, self._cache, self._seen))
        leaves, tree = jax.tree.flatten(self._shapes)
        self._signature = (model_config, config.prefill_chunk, tuple(leaves), tree)
        self.programs_warm = self.programs_total = 0  # of the warm-up
        self.warming = False
        self.steps_run = self.prefills_run = 0
        self.prompts_prefilled = 0  # distinct prompts over all prefills
        self.largest_batch = 0  # most completions decoded in one step
        self.tokens_generated = 0  # over all completions, EOS included
        self._worker = threading.Thread(target=self._work, name="minimind-decode", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ public
    def submit(self, completion: Completion) -> None:
        """Queue a completion; raises QueueFull or EngineStopped instead of waiting."""
        self.submit_all([completion])

    def submit_all(self, completions: list[Completion]) -> None:
        """Queue completions together (all or none, e.g. the `n` choices of one request)."""
        with self._lock:
            if self._stopping or not self._worker.is_alive():
                raise EngineStopped("the decoder is not running")
            if len(self._waiting) + len(completions) > self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} choices are waiting already")
            self._waiting.extend(completions)
            self._lock.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._slots.occupied())

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._stopping

    @property
    def compilations(self) -> int:
        return compilations()

    def warm_up(self, progress: Callable[[int, int], None] | None = None,
                threads: int = 1) -> int:
        """Compile the programs of the common buckets, so no request waits for a compilation in
        them (nor do the rows decoding beside it): the decode step of every row count and cache
        length, every prefill that admission makes of distinct prompts (one per newcomer) up to
        `prefill_chunk` tokens, and one long prompt's chunk for one slot at every cached length.
        The likeliest first (fewest rows, shortest lengths), `threads` at a time, each compiled
        and run once on scratch buffers (a cache's worth each): the engine's state is not
        touched, so requests may come meanwhile. It uses idle time only: a program starts when
        no request waits or decodes (a compilation beside them would slow their steps and
        their own compilations down), and a program a request needs is compiled by the worker
        (or waited for, when a warm-up thread compiles it already).
        `progress(done, total)` after each program. Returns how many programs it warmed."""
        programs = self._warm_programs()
        self.programs_total, self.programs_warm, self.warming = len(programs), 0, True
        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="minimind-warm")
        try:
            futures = [pool.submit(self._when_idle, program) for program in programs]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                self.programs_warm += 1
                if progress is not None:
                    progress(self.programs_warm, len(programs))
        finally:
            pool.shutdown(cancel_futures=True)
            self.warming = False
        return len(programs)

    def start_warm_up(self, progress: Callable[[int, int], None] | None = None,
                      threads: int = 1, then: Callable[[int], None] | None = None) -> None:
        """`warm_up` in a background thread (serving goes on meanwhile); `then(count)` after."""
        self.warming = True

        def warm() -> None:
            count = self.warm_up(progress, threads)
            if then is not None:
                then(count)
        threading.Thread(target=warm, name="minimind-warm-up", daemon=True).start()

    def _warm_programs(self) -> list[Callable[[], None]]:
        """The warm-up's programs, likeliest first: by rows, then length."""
        cfg = self.config
        longest = cfg.max_context - 1  # prompt + 1 token
        programs = [((r, kv, 0), functools.partial(self._warm_step, r, kv))
                    for r in sorted({decode_rows(n, cfg.max_batch)
                                     for n in range(1, cfg.max_batch + 1)})
                    for kv in buckets(MIN_KV_BUCKET, cfg.max_context)]
        programs += [((n, P, 1), functools.partial(self._warm_prefill, n, P))
                     for n in buckets(1, cfg.max_batch)
                     for P in buckets(MIN_PROMPT_BUCKET, cfg.max_context,
                                      range(1, min(cfg.prefill_chunk, longest) + 1))
                     if self._one_prefill(n, P)]
        if longest > cfg.prefill_chunk:  # chunks start at multiples of prefill_chunk
            kv_lens = {power_of_two_at_least(offset, MIN_KV_BUCKET, cfg.max_context)
                       for offset in range(0, longest, cfg.prefill_chunk)}
            programs += [((1, kv, 2), functools.partial(self._warm_extend, kv))
                         for kv in kv_lens]
        return [program for _, program in sorted(programs, key=lambda p: p[0])]

    def _when_idle(self, program: Callable[[], None]) -> None:
        """Run a warm-up `program` once no request waits or decodes (polling, not on the
        worker's condition, whose notify must wake the worker); skip it when stopping."""
        while not self._stopping and (self._waiting or self._slots.occupied()):
            time.sleep(0.05)
        if not self._stopping:
            program()

    def _warm(self, key: tuple, fn, *args, **statics):
        """Compile `key`'s program from these arguments' shapes and run it once, with zeros for
        the shapes-only ones (scratch buffers: the engine's state stays as it was), since an
        executable's first run costs more than the next (0.3-0.5 s with YNNPACK fusions), which
        the first request of its bucket would pay otherwise. Returns its outputs."""
        program = self._program(key, fn, *args, **statics)
        scratch = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding)
                               if isinstance(x, jax.ShapeDtypeStruct) else x, args)
        return jax.block_until_ready(program(*scratch))

    def _warm_step(self, rows: int, kv_len: int) -> None:
        _, cache, seen = self._shapes
        _, written, seen_RV = self._warm(
            ("step", rows, kv_len), _decode_step, self.params, cache, seen,
            *self._step_inputs(rows, np.zeros(rows, np.int32)), config=self.model_config,
            rows=rows, kv_len=kv_len)
        self._warm(("store", rows), _store_step, cache, seen, written, seen_RV,
                   np.zeros(rows, bool))

    def _warm_prefill(self, n: int, P: int) -> None:
        _, cache, seen = self._shapes
        self._warm(("prefill", n, n, P), _prefill, self.params, cache, seen,
                   np.zeros((n, P), np.int32), np.ones(n, np.int32),
                   np.arange(n, dtype=np.int32), *self._slots.padded([], n),
                   config=self.model_config)

    def _warm_extend(self, kv_len: int) -> None:
        _, cache, seen = self._shapes
        one = np.ones(1, np.int32)
        self._warm(("extend", 1, 1, kv_len), _extend, self.params, cache, seen,
                   np.zeros((1, self.config.prefill_chunk), np.int32), one, one, one,
                   np.zeros(1, np.int32), *self._slots.padded([], 1),
                   config=self.model_config, kv_len=kv_len)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new work and fail what waits or decodes (the worker stops after its step)."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify_all()
        for completion in waiting:
            completion.finish(("error", "the server is shutting down"))
        self._worker.join(timeout)

    # ------------------------------------------------------------ worker
    def _reset_device_state(self) -> None:
        cfg = self.config
        self._cache = init_cache(self.model_config, cfg.max_batch, cfg.max_context,
                                 per_row_index=True)
        self._seen = jnp.zeros((cfg.max_batch, self.model_config.vocab_size), bool)

    def _work(self) -> None:
        while True:
            newcomers = self._admit()
            if newcomers is None:
                break
            try:
                whole = [(slot, c) for slot, c in newcomers
                         if len(c.prompt_ids) <= self.config.prefill_chunk]
                if whole:
                    self._prefill(whole)
                if self._slots.prefilling():
                    self._extend()
                if self._slots.decoding():
                    self._step()
            except Exception as err:  # a failed program fails its requests, not the server
                self._fail_all(f"decoding failed: {type(err).__name__}: {err}")
                self._reset_device_state()  # its buffers may have been donated
        self._fail_all("the server is shutting down")

    def _admit(self) -> list[tuple[int, Completion]] | None:
        """Seat waiting completions in free slots (waiting for one when idle); None: stop."""
        with self._lock:
            idle = not self._slots.occupied()
            while idle and not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
        if idle:
            time.sleep(self.config.batch_wait_s)  # let requests sent together start together
        with self._lock:
            seated, prompts, longest = [], set(), 0  # the short prompts' prefill so far
            for slot in self._slots.free():
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft().finish(("end", "cancelled"))
                if not self._waiting:
                    break
                ids = tuple(self._waiting[0].prompt_ids)
                if len(ids) <= self.config.prefill_chunk:  # longer ones go in chunks
                    if not self._one_prefill(len(prompts | {ids}), max(longest, len(ids))):
                        break
                    prompts.add(ids)
                    longest = max(longest, len(ids))
                completion = self._waiting.popleft()
                seed = completion.seed if completion.seed is not None else next(self._seeds)
                self._slots.seat(slot, completion, seed)
                seated.append((slot, completion))
        return seated

    def _one_prefill(self, prompts: int, longest: int) -> bool:
        """Whether one prefill takes `prompts` distinct prompts of up to `longest` tokens: one
        prompt always, several while their padded tokens stay within `prefill_chunk` (what a
        chunk of a long prompt costs the rows decoding meanwhile)."""
        rows, width = self._prefill_bucket(prompts, longest)
        return rows == 1 or rows * width <= self.config.prefill_chunk

    def _prefill_bucket(self, prompts: int, longest: int) -> tuple[int, int]:
        """The (rows, width) a prefill of `prompts` distinct prompts of up to `longest` tokens
        is padded to."""
        cfg = self.config
        return (power_of_two_at_least(prompts, 1, cfg.max_batch),
                power_of_two_at_least(longest, MIN_PROMPT_BUCKET, cfg.max_context))

    def _prefill(self, newcomers: list[tuple[int, Completion]]) -> None:
        """Prefill the newcomers' prompts, each distinct prompt once (the `n` choices of a
        request share theirs), and hand out their first tokens."""
        cfg = self.config
        prompts: dict[tuple[int, ...], int] = {}  # distinct prompt -> its row
        source = [prompts.setdefault(tuple(c.prompt_ids), len(prompts)) for _, c in newcomers]
        u, P = self._prefill_bucket(len(prompts), max(map(len, prompts)))
        n = power_of_two_at_least(len(newcomers), 1, cfg.max_batch)
        ids_UP = np.full((u, P), self.pad_id, np.int32)
        lengths_U = np.ones(u, np.int32)
        for prompt, row in prompts.items():
            ids_UP[row, :len(prompt)], lengths_U[row] = prompt, len(prompt)
        source_A = np.zeros(n, np.int32)
        source_A[:len(source)] = source
        self._cache, self._seen, first_A = self._run(
            ("prefill", u, n, P), _prefill, self.params, self._cache, self._seen, ids_UP,
            lengths_U, source_A, *self._slots.padded([slot for slot, _ in newcomers], n),
            config=self.model_config)
        self.prefills_run += 1
        self.prompts_prefilled += len(prompts)
        first_A = np.asarray(first_A)
        for row, (slot, completion) in enumerate(newcomers):
            self._slots.prefilled[slot] = len(completion.prompt_ids)
            self._hand_out(slot, int(first_A[row]))

    def _extend(self) -> None:
        """Feed long prompts still prefilling their next chunk, each distinct chunk once (the
        `n` choices of a request share theirs): all of them when no row is decoding, else only
        the earliest seated prompt's, so rows decoding wait for one chunk between two of their
        tokens however many long prompts arrive. Hand out the first token of those a chunk
        completes."""
        slots, C, B = self._slots, self.config.prefill_chunk, self.config.max_batch
        for slot in slots.prefilling():
            if slots.owner[slot].cancelled.is_set():
                self._release(slot, ("end", "cancelled"))
        sharing: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (prompt, cached) -> slots
        for slot in slots.prefilling():  # earliest seated first
            key = (tuple(slots.owner[slot].prompt_ids), int(slots.prefilled[slot]))
            sharing.setdefault(key, []).append(slot)
        chunks = list(sharing.items())[:1 if slots.decoding() else None]
        if not chunks:
            return
        fed = [(row, slot) for row, (_, members) in enumerate(chunks) for slot in members]
        u = power_of_two_at_least(len(chunks), 1, B)
        n = power_of_two_at_least(len(fed), 1, B)
        ids_UC = np.full((u, C), self.pad_id, np.int32)
        lengths_U, offset_U = np.ones(u, np.int32), np.zeros(u, np.int32)
        reader_U = np.full(u, B, np.int32)  # padding rows read the last slot
        for row, ((prompt, offset), members) in enumerate(chunks):
            chunk = prompt[offset:offset + C]
            ids_UC[row, :len(chunk)], lengths_U[row] = chunk, len(chunk)
            offset_U[row], reader_U[row] = offset, members[0]
        source_A = np.zeros(n, np.int32)
        source_A[:len(fed)] = [row for row, _ in fed]
        kv_len = power_of_two_at_least(int(offset_U.max()), MIN_KV_BUCKET,
                                       self.config.max_context)
        self._cache, self._seen, next_A = self._run(
            ("extend", u, n, kv_len), _extend, self.params, self._cache, self._seen, ids_UC,
            lengths_U, offset_U, reader_U, source_A, *slots.padded([slot for _, slot in fed], n),
            config=self.model_config, kv_len=kv_len)
        self.prefills_run += 1
        next_A = np.asarray(next_A)
        for row, (prompt, offset) in enumerate(key for key, _ in chunks):
            if offset + lengths_U[row] == len(prompt):
                self.prompts_prefilled += 1
        for a, (row, slot) in enumerate(fed):
            slots.prefilled[slot] += lengths_U[row]
            if slots.prefilled[slot] == len(slots.owner[slot].prompt_ids):
                self._hand_out(slot, int(next_A[a]))

    def _step(self) -> None:
        slots = self._slots
        occupied = slots.decoding()  # rows still prefilling sit this step out
        rows = decode_rows(occupied[-1] + 1, self.config.max_batch)
        kv_len = power_of_two_at_least(int(slots.position[occupied].max()) + 1, MIN_KV_BUCKET,
                                       self.config.max_context)
        counts_R = np.array([owner.generated if owner else 0 for owner in slots.owner[:rows]],
                            np.int32)
        next_R = self._decode(rows, kv_len, np.isin(np.arange(rows), occupied), counts_R)
        self.steps_run += 1
        self.largest_batch = max(self.largest_batch, len(occupied))
        for slot in occupied:
            slots.position[slot] += 1
            self._hand_out(slot, int(next_R[slot]))

    def _decode(self, rows: int, kv_len: int, active_R: np.ndarray,
                counts_R: np.ndarray) -> np.ndarray:
        """One decode step of the first `rows` slots over `kv_len` cache positions, stored for
        the `active_R` rows only; the next token of each row."""
        next_R, written, seen_RV = self._run(
            ("step", rows, kv_len), _decode_step, self.params, self._cache, self._seen,
            *self._step_inputs(rows, counts_R), config=self.model_config, rows=rows,
            kv_len=kv_len)
        self._cache, self._seen = self._run(("store", rows), _store_step, self._cache,
                                            self._seen, written, seen_RV, active_R)
        return np.asarray(next_R)

    def _step_inputs(self, rows: int, counts_R: np.ndarray) -> tuple:
        """A decode step's host inputs: each row's last token, seed, count and settings."""
        slots = self._slots
        return slots.last_token[:rows], slots.seed[:rows], counts_R, slots.rows(slice(0, rows))

    def _program(self, key: tuple, fn, *args, **statics):
        """The compiled program of `key`, compiled from these arguments' shapes (and the static
        ones) unless an earlier call compiled it."""
        return PROGRAMS.get((self._signature, *key),
                            lambda: fn.lower(*args, **statics).compile())

    def _run(self, key: tuple, fn, *args, **statics):
        return self._program(key, fn, *args, **statics)(*args)

    def _hand_out(self, slot: int, token: int) -> None:
        """Give a slot's new token to its completion; free the slot when that one is done."""
        slots = self._slots
        completion = slots.owner[slot]
        if completion.cancelled.is_set():
            self._release(slot, ("end", "cancelled"))
            return
        completion.generated += 1
        self.tokens_generated += 1
        if token == self.eos_id:
            self._release(slot, ("end", "stop"))
            return
        completion.on_event(("token", token))
        slots.last_token[slot] = token
        context = len(completion.prompt_ids) + completion.generated
        if (completion.generated >= completion.sampling.max_new_tokens
                or context >= self.config.max_context):
            self._release(slot, ("end", "length"))

    def _release(self, slot: int, event: tuple) -> None:
        completion, self._slots.owner[slot] = self._slots.owner[slot], None
        completion.finish(event)

    def _fail_all(self, message: str) -> None:
        for slot in self._slots.occupied():
            self._release(slot, ("error", message))
