"""The server's continuous-batching engine: requests join and leave the running decode batch
at token granularity, each gets what `generate` gives it, and sampling is per request."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.infer.generate import generate_tokens
from minimind_jax.infer.sampling import (
    SamplingConfig,
    filter_top_k_top_p,
    next_token_per_row,
)
from minimind_jax.serve.engine import BatchEngine, Completion, EngineConfig
from tests.helpers import wait_until
from tests.serve_fixtures import TINY, tiny_model


@pytest.fixture(scope="module")
def params():
    return tiny_model()


class Recorder:
    """Collects each completion's events, in one shared order across completions."""

    def __init__(self):
        self.log, self.lock = [], threading.Lock()
        self.ended: dict[str, threading.Event] = {}

    def sink(self, name: str):
        self.ended[name] = threading.Event()

        def on_event(event):
            with self.lock:
                self.log.append((name, *event))
            if event[0] != "token":
                self.ended[name].set()
        return on_event

    def tokens(self, name: str) -> list[int]:
        return [e[2] for e in self.log if e[0] == name and e[1] == "token"]

    def end(self, name: str) -> tuple:
        return next(e[1:] for e in self.log if e[0] == name and e[1] != "token")

    def wait(self, timeout: float = 120) -> None:
        for name, ended in self.ended.items():
            assert ended.wait(timeout), f"{name} did not end"


def greedy(n: int, repetition_penalty: float = 1.0) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=n,
                          repetition_penalty=repetition_penalty)


def test_requests_joining_mid_decode_get_what_generate_gives(params):
    """Ten prompts of 3-39 tokens with limits of 1-40 tokens arrive 30 ms apart at a 4-slot
    engine: rows join while others are dozens of tokens in and leave at their own limits, and
    every answer is `generate`'s for that prompt alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 6000, rng.integers(3, 40)).tolist() for _ in range(10)]
    limits = [5, 30, 12, 40, 1, 25, 8, 33, 17, 20]
    expected = [generate_tokens(params, TINY, [p], greedy(n), eos_id=-1)[0]
                for p, n in zip(prompts, limits, strict=True)]
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=4, max_context=128, batch_wait_s=0))
    recorder = Recorder()
    try:
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            engine.submit(Completion(prompt, greedy(limit), recorder.sink(str(i))))
            time.sleep(0.03)
        recorder.wait()
    finally:
        engine.stop()
    for i in range(10):
        assert recorder.tokens(str(i)) == expected[i], i
        assert recorder.end(str(i)) == ("end", "length")
    assert engine.largest_batch == 4 and engine.prefills_run > 1
    assert engine.tokens_generated == sum(limits)


def test_a_request_does_not_wait_for_the_running_batch_to_finish(params):
    """Static batching made a late request wait for the whole batch; here it decodes beside
    the long one and is done while that one still runs."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=128, batch_wait_s=0))
    recorder = Recorder()
    try:
        long_sink = recorder.sink("long")
        engine.submit(Completion([5, 6, 7, 8], greedy(100), long_sink))
        wait_until(lambda: len(recorder.tokens("long")) >= 10, 120, "10 tokens of the long row")
        engine.submit(Completion([9, 10, 11], greedy(5), recorder.sink("short")))
        recorder.wait()
    finally:
        engine.stop()
    order = [name for name, kind, *_ in recorder.log]
    short_done = len(order) - 1 - order[::-1].index("short")
    assert order.index("short") > 10 and order[short_done + 1:].count("long") > 20
    assert recorder.tokens("short") == generate_tokens(params, TINY, [[9, 10, 11]], greedy(5),
                                                       eos_id=-1)[0]


def test_a_seeded_sampled_request_draws_the_same_alone_and_in_company(params):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12)
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=4, max_context=128, batch_wait_s=0.05))
    try:
        alone = Recorder()
        engine.submit(Completion([5, 6, 7], sampling, alone.sink("me"), seed=7))
        alone.wait()
        crowd = Recorder()
        engine.submit_all([Completion([9, 9, 9, 9, 9], sampling, crowd.sink("a"), seed=1),
                           Completion([5, 6, 7], greedy(20), crowd.sink("b")),
                           Completion([5, 6, 7], sampling, crowd.sink("me"), seed=7),
                           Completion([5, 6, 7], sampling, crowd.sink("other"), seed=8)])
        crowd.wait()
    finally:
        engine.stop()
    assert crowd.tokens("me") == alone.tokens("me") and len(alone.tokens("me")) == 12
    assert crowd.tokens("other") != crowd.tokens("me")  # another seed, another draw


def test_each_request_gets_its_own_repetition_penalty_in_one_batch(params):
    """Two requests for the same prompt in one prefill and the same decode steps, greedy, with
    repetition penalty 1.3 and 1.0: each answer is `generate`'s with its own setting (the
    penalty is a per-row setting of the engine, not the server's), and the two differ."""
    prompt, n = [9, 10, 11], 24  # at 1.0 its answer repeats a token: 1.3 answers otherwise
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=128, batch_wait_s=0.05))
    recorder = Recorder()
    try:
        engine.submit_all([Completion(prompt, greedy(n, penalty), recorder.sink(str(penalty)))
                           for penalty in (1.3, 1.0)])
        recorder.wait()
    finally:
        engine.stop()
    assert (engine.prefills_run, engine.largest_batch) == (1, 2)  # together all along
    answers = {}
    for penalty in (1.3, 1.0):
        answers[penalty] = recorder.tokens(str(penalty))
        assert answers[penalty] == generate_tokens(params, TINY, [prompt], greedy(n, penalty),
                                                   eos_id=-1)[0], penalty
        assert len(answers[penalty]) == n
    assert answers[1.3][:11] == answers[1.0][:11] and answers[1.3][11] != answers[1.0][11]


def test_no_compilation_for_new_requests_in_seen_buckets(params):
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=128, batch_wait_s=0))
    try:
        def run(prompts, sampling):
            recorder = Recorder()
            engine.submit_all([Completion(p, sampling, recorder.sink(str(i)))
                               for i, p in enumerate(prompts)])
            recorder.wait()

        run([[5, 6, 7], [8, 9]], greedy(10))
        before = engine.compilations
        run([[11, 12, 13, 14], [15]], SamplingConfig(temperature=0.7, top_p=0.5,
                                                     max_new_tokens=8))
        assert engine.compilations == before
    finally:
        engine.stop()


def test_a_row_that_fills_the_context_ends_with_length(params):
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=40, batch_wait_s=0))
    recorder = Recorder()
    try:
        engine.submit(Completion(list(range(3, 33)), greedy(100), recorder.sink("x")))
        recorder.wait()
    finally:
        engine.stop()
    assert len(recorder.tokens("x")) == 10 and recorder.end("x") == ("end", "length")


def test_per_row_sampling_settings_are_each_rows_own():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(4, 300)).astype(np.float32) * 3)
    top_k, top_p = np.array([0, 5, 40, 0]), np.array([0.6, 1.0, 0.3, 1.0], np.float32)
    per_row = np.asarray(filter_top_k_top_p(logits, top_k, top_p))
    for row in range(4):
        alone = np.asarray(filter_top_k_top_p(logits[row:row + 1], int(top_k[row]),
                                              float(top_p[row])))
        np.testing.assert_array_equal(per_row[row:row + 1], alone)
    seen = jnp.zeros((4, 300), bool)
    rows = {"temperature": jnp.asarray([0.0, 1.0, 1.0, 0.0]),
            "top_p": jnp.asarray([1.0, 1.0, 1.0, 1.0]), "top_k": jnp.asarray([0, 1, 0, 0]),
            "repetition_penalty": jnp.ones(4)}
    draws = np.stack([np.asarray(next_token_per_row(logits, seen, jnp.arange(4, dtype=jnp.uint32),
                                                    jnp.full(4, count), rows))
                      for count in range(20)])
    argmax = np.asarray(logits).argmax(-1)
    # greedy rows and top-k 1 always pick the argmax; the free row does not
    assert (draws[:, [0, 1, 3]] == argmax[[0, 1, 3]]).all()
    assert len(set(draws[:, 2].tolist())) > 5


def test_newcomers_sharing_a_prompt_prefill_it_once(params):
    """The `n` choices of a request (and any newcomers with the same prompt) share one prefill
    row: two distinct prompts among five newcomers are prefilled once each, and every
    newcomer still gets what `generate` gives its prompt alone."""
    shared, other = [5, 6, 7, 8, 9], [11, 12]
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=8, max_context=128, batch_wait_s=0))
    recorder = Recorder()
    try:
        engine.submit_all([Completion(shared if i != 2 else other, greedy(6 + i),
                                      recorder.sink(str(i))) for i in range(5)])
        recorder.wait()
    finally:
        engine.stop()
    assert (engine.prefills_run, engine.prompts_prefilled) == (1, 2)
    for i in range(5):
        prompt = shared if i != 2 else other
        assert recorder.tokens(str(i)) == generate_tokens(params, TINY, [prompt],
                                                          greedy(6 + i), eos_id=-1)[0], i


def test_long_prompts_prefilled_in_chunks_get_what_generate_gives(params):
    """Prompts longer than prefill_chunk (8 here) are fed 8 tokens per loop, from their cached
    part on, while other rows decode: every answer is still `generate`'s, also with a
    repetition penalty (whose seen-token rows the chunks build and the decode steps of other
    rows must leave alone), and sampling with a seed draws what an unchunked engine draws."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 6000, n).tolist() for n in (5, 37, 8, 9, 64, 23)]
    limits = [30, 12, 25, 9, 7, 15]
    penalty = SamplingConfig(temperature=0.0, repetition_penalty=1.3, max_new_tokens=1)

    def answers(engine_config, sampling_of):
        engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0, config=engine_config)
        recorder = Recorder()
        try:
            for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
                engine.submit(Completion(prompt, sampling_of(limit), recorder.sink(str(i)),
                                         seed=i))
                time.sleep(0.02)
            recorder.wait()
        finally:
            engine.stop()
        return [recorder.tokens(str(i)) for i in range(len(prompts))], engine

    chunked = EngineConfig(max_batch=4, max_context=128, batch_wait_s=0, prefill_chunk=8)
    got, engine = answers(chunked, greedy)
    assert engine.prompts_prefilled == len(prompts)
    assert engine.prefills_run >= 64 // 8  # the longest alone took 8 calls
    for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
        assert got[i] == generate_tokens(params, TINY, [prompt], greedy(limit), eos_id=-1)[0], i
    got, _ = answers(chunked, lambda n: dataclasses.replace(penalty, max_new_tokens=n))
    for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
        alone = generate_tokens(params, TINY, [prompt],
                                dataclasses.replace(penalty, max_new_tokens=limit), eos_id=-1)
        assert got[i] == alone[0], i
    sampled = lambda n: SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=n)
    whole = dataclasses.replace(chunked, prefill_chunk=128)
    assert answers(chunked, sampled)[0] == answers(whole, sampled)[0]


def test_rows_decoding_keep_going_while_a_long_prompt_prefills(params):
    """A 96-token prompt in chunks of 8 takes 12 loops to prefill; the row already decoding
    gets a token in each of them instead of waiting for one prefill of the whole prompt."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=128, batch_wait_s=0,
                                             prefill_chunk=8))
    recorder = Recorder()
    try:
        engine.submit(Completion([5, 6, 7], greedy(100), recorder.sink("running")))
        wait_until(lambda: len(recorder.tokens("running")) >= 3, 120,
                   "3 tokens of the running row")
        engine.submit(Completion(list(range(3, 99)), greedy(4), recorder.sink("long")))
        recorder.wait()
    finally:
        engine.stop()
    order = [name for name, kind, *_ in recorder.log if kind == "token"]
    first_long = order.index("long")
    assert first_long - 3 >= 11, order[:first_long + 1]  # tokens of "running" meanwhile
    assert recorder.tokens("long") == generate_tokens(params, TINY, [list(range(3, 99))],
                                                      greedy(4), eos_id=-1)[0]


def test_a_decode_step_leaves_the_seen_tokens_of_a_prefilling_row_alone(params):
    """Repetition penalty state: a slot that sits decode steps out while its long prompt
    prefills (slot 0 here, below the running row in slot 1) keeps exactly its prompt's tokens
    as seen, not the stale last token of the slot's earlier occupant."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=128, batch_wait_s=0.05,
                                             prefill_chunk=8))
    recorder = Recorder()
    try:
        # one prompt for both, so they are admitted together (two prompts would pad past
        # prefill_chunk 8 in one prefill: the second would take slot 0 once the first ended)
        engine.submit_all([Completion([5, 6, 7], greedy(2, 1.3), recorder.sink("earlier")),
                           Completion([5, 6, 7], greedy(60, 1.3), recorder.sink("running"))])
        assert recorder.ended["earlier"].wait(60), "the earlier row did not end"
        stale = recorder.tokens("earlier")[-1]
        prompt = [t for t in range(3, 110) if t != stale][:96]
        engine.submit(Completion(prompt, greedy(1, 1.3), recorder.sink("long")))
        recorder.wait()
    finally:
        engine.stop()
    assert len(recorder.tokens("running")) == 60  # it decoded all along
    seen = set(np.flatnonzero(np.asarray(engine._seen[0])).tolist())
    assert seen == set(prompt), sorted(seen ^ set(prompt))


def test_long_prompts_arriving_together_take_turns_while_rows_decode(params):
    """Two 48-token prompts in chunks of 8 arrive together while a row decodes: one chunk per
    loop, the earlier seated prompt first, so the running row waits for one chunk at a time
    (a token between every two chunks) and the first prompt answers 6 loops before the other."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=4, max_context=128, batch_wait_s=0,
                                             prefill_chunk=8))
    recorder = Recorder()
    prompts = {"a": list(range(3, 51)), "b": list(range(60, 108))}
    try:
        engine.submit(Completion([5, 6, 7], greedy(100), recorder.sink("running")))
        wait_until(lambda: len(recorder.tokens("running")) >= 3, 120,
                   "3 tokens of the running row")
        engine.submit_all([Completion(prompts[name], greedy(2), recorder.sink(name))
                           for name in prompts])
        recorder.wait()
    finally:
        engine.stop()
    order = [name for name, kind, *_ in recorder.log if kind == "token"]
    first_a, first_b = order.index("a"), order.index("b")
    assert order[first_a:first_b].count("running") >= 5, order
    assert order[:first_b].count("running") - 3 >= 11, order
    for name, prompt in prompts.items():
        assert recorder.tokens(name) == generate_tokens(params, TINY, [prompt], greedy(2),
                                                        eos_id=-1)[0]


def test_the_choices_of_a_long_prompt_share_its_chunks(params):
    """Three choices of one 48-token prompt (chunks of 8) arrive while a row decodes: each
    chunk is computed once for all three (6 loops, not 18: the running row waits 6 chunks for
    them), and each choice draws with its own seed what it draws from a whole-prompt prefill."""
    prompt = list(range(3, 51))
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12)

    def answers(prefill_chunk):
        engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                             config=EngineConfig(max_batch=4, max_context=128, batch_wait_s=0,
                                                 prefill_chunk=prefill_chunk))
        recorder = Recorder()
        try:
            engine.submit(Completion([5, 6, 7], greedy(60), recorder.sink("running")))
            wait_until(lambda: len(recorder.tokens("running")) >= 3, 120,
                       "3 tokens of the running row")
            submitted = len(recorder.log)
            engine.submit_all([Completion(prompt, sampled, recorder.sink(str(i)), seed=i)
                               for i in range(3)])
            recorder.wait()
        finally:
            engine.stop()
        return [recorder.tokens(str(i)) for i in range(3)], engine, recorder.log[submitted:]

    chunked, engine, log = answers(8)
    assert (engine.prefills_run, engine.prompts_prefilled) == (1 + 48 // 8, 2)
    order = [name for name, kind, *_ in log if kind == "token"]
    # one step may be in flight at the submit; 3 x 6 chunks would give the running row 18
    assert order[:order.index("0")].count("running") <= 48 // 8 + 1, order
    assert len({tuple(tokens) for tokens in chunked}) == 3  # three seeds, three draws
    assert chunked == answers(128)[0]


def test_warm_up_compiles_what_requests_then_use_and_changes_nothing(params):
    """warm_up runs every common bucket's programs once on no slot: the engine's state is as it
    was, and requests of those buckets (one prompt, three arriving together, a long prompt in
    chunks beside decoding rows, up to 4 rows and the whole context) compile nothing more and
    get what `generate` gives. The engine's shapes (4 slots of 96 positions) are this test's
    own, so no other test compiled its programs first."""
    config = EngineConfig(max_batch=4, max_context=96, batch_wait_s=0, prefill_chunk=16)
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0, config=config)
    try:
        state = [np.asarray(x) for x in jax.tree.leaves((engine._cache, engine._seen))]
        before, reported = engine.compilations, []
        count = engine.warm_up(lambda done, total: reported.append((done, total)))
        # decode steps: rows 1 and 4 (2 is not a bucket) x cache length 96 (the floor of 256,
        # capped); prefills: one prompt of 32 (two would pad past prefill_chunk 16, so the three
        # that arrive together are admitted one per loop); chunks: cached length 96
        assert count == 2 + 1 + 1 and reported == [(i, count) for i in range(1, count + 1)]
        assert engine.compilations - before == 2 + 1 + 1 + 2  # + the store step of each rows
        for was, now in zip(state, jax.tree.leaves((engine._cache, engine._seen)), strict=True):
            np.testing.assert_array_equal(was, np.asarray(now))
        warm = engine.compilations

        rng = np.random.default_rng(7)
        prompts = [rng.integers(3, 6000, n).tolist() for n in (5, 9, 3, 12, 40)]
        limits = [60, 20, 30, 25, 50]
        recorder = Recorder()
        engine.submit(Completion(prompts[0], greedy(limits[0]), recorder.sink("0")))
        time.sleep(0.3)
        engine.submit_all([Completion(prompts[i], greedy(limits[i]), recorder.sink(str(i)))
                           for i in (1, 2, 3)])
        time.sleep(0.3)
        engine.submit(Completion(prompts[4], greedy(limits[4]), recorder.sink("4")))
        recorder.wait()
        assert engine.compilations == warm
        assert engine.largest_batch >= 3
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            assert recorder.tokens(str(i)) == generate_tokens(params, TINY, [prompt],
                                                              greedy(limit), eos_id=-1)[0], i
        assert engine.warm_up() == count and engine.compilations == warm  # all there already
    finally:
        engine.stop()


def test_a_request_during_a_background_warm_up_gets_what_generate_gives(params):
    """start_warm_up serves meanwhile: a request sent while it runs is answered as `generate`
    answers it (its programs compiled by the worker, or waited for when a warm-up thread has
    them in hand), and the warm-up still ends with every program. Shapes (2 slots of 80
    positions, chunks of 16) are this test's own."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=2, max_context=80, batch_wait_s=0,
                                             prefill_chunk=16))
    gate, finished, reported = threading.Event(), threading.Event(), []
    try:
        engine.start_warm_up(lambda done, total: (reported.append(done), gate.wait(300)),
                             then=lambda count: finished.set())
        recorder, prompt = Recorder(), [7, 300, 41, 9, 1200]
        engine.submit(Completion(prompt, greedy(20), recorder.sink("0")))
        recorder.wait()
        assert engine.warming and engine.programs_warm <= 1  # held at its first program
        assert recorder.tokens("0") == generate_tokens(params, TINY, [prompt], greedy(20),
                                                       eos_id=-1)[0]
        gate.set()
        assert finished.wait(300)
        # decode steps: rows 1, 2 x cache length 80; prefills: one prompt of 32; chunks:
        # cached length 80
        assert not engine.warming and engine.programs_warm == engine.programs_total == 2 + 1 + 1
        assert reported == list(range(1, 5))
        warm = engine.compilations
        assert engine.warm_up() == 4 and engine.compilations == warm  # all there already
    finally:
        gate.set()
        engine.stop()
