"""Rollouts for RL: G completions of each prompt, from one of three engines.

- `SamplingEngine` (ours): the KV-cache decoder on the current train params (no copy), with
  minimind-3's `generate` as its RL scripts call it (shared/SPEC_RL.md 1.2): temperature 0.8,
  its defaults top_k 50 and top_p 0.85, left-padded prompts whose positions are the column
  index (not rebased) and whose padding no query attends to, finished rows filled with EOS,
  decoding until every row has finished or `max_new_tokens` are out.
- `ReplayEngine`: the token ids a reference run sampled (recorded by a golden maker), step by
  step, so a run can be compared with the reference's exactly.
- `ScriptEngine`: canned completion texts, for tests and demos.

Every engine returns a `Rollout`: rows ordered prompt-major (row i * G + j is prompt i's j-th
completion), `output_ids` = prompt ⊕ completion [N, P + R], R the steps decoded. The old
log-probs are the trainer's to compute (one forward of the policy; shared/SPEC_RL.md 1.2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.infer.buckets import power_of_two_at_least
from minimind_jax.infer.sampling import next_token
from minimind_jax.model.config import ModelConfig

TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.85  # the scripts' temperature, generate's defaults


@dataclasses.dataclass(frozen=True)
class Rollout:
    output_ids: np.ndarray  # [N, P + R] int32, prompt (left-padded) then completion
    prompt_len: int  # P
    completions: list[str]  # each completion decoded without special tokens

    @property
    def completion_ids(self) -> np.ndarray:
        return self.output_ids[:, self.prompt_len:]


def _finish(output_ids: np.ndarray, prompt_len: int, tokenizer) -> Rollout:
    texts = [tokenizer.decode(row[prompt_len:].tolist(), skip_special_tokens=True)
             for row in output_ids]
    return Rollout(output_ids.astype(np.int32), prompt_len, texts)


MIN_PROMPT_WIDTH = 16


def prompt_width(prompt_len: int) -> int:
    """The width a `prompt_len`-token prompt batch is padded to on the right for the sampler:
    the next power of two (at least MIN_PROMPT_WIDTH), so prompts of any length compile a few
    sampler programs, not one per length."""
    return power_of_two_at_least(prompt_len, MIN_PROMPT_WIDTH)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _sample(params, ids_NW, mask_NW, prompt_len, rng, scalars: dict, eos_id, *,
            config: ModelConfig, max_new_tokens: int, greedy: bool = False):
    """Prefill, then one token per step until all rows are done: (tokens [N, max_new] with EOS
    after each row's end, steps taken). `greedy` takes the argmax (`generate(do_sample=False)`).

    The prompts are the first `prompt_len` (P) columns of `ids_NW`; the columns after them are
    padding (mask 0), which no query sees: token t of a completion has position P + t, as if
    it followed column P - 1 directly, so any padded width gives the same completions."""
    from minimind_jax.model.transformer import MiniMind, init_cache

    model = MiniMind(config)
    N, W = ids_NW.shape
    positions_NW = jnp.broadcast_to(jnp.arange(W)[None], (N, W))
    cache = init_cache(config, N, W + max_new_tokens)
    logits_NWV, _, cache = model.apply({"params": params}, ids_NW, positions=positions_NW,
                                       segment_ids=mask_NW.astype(jnp.int32), cache=cache)
    last_NV = jax.lax.dynamic_index_in_dim(logits_NWV, prompt_len - 1, axis=1, keepdims=False)
    unseen_NV = jnp.zeros((N, config.vocab_size), bool)  # repetition penalty 1: unused

    def pick(logits_NV, done_N, rng):
        token_N = next_token(logits_NV, unseen_NV, rng, scalars, greedy=greedy)
        token_N = jnp.where(done_N, eos_id, token_N)
        return token_N, done_N | (token_N == eos_id)

    rng, first = jax.random.split(rng)
    token_N, done_N = pick(last_NV, jnp.zeros((N,), bool), first)
    tokens_NR = jnp.full((N, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(token_N)

    def cond(state):
        step, _, done_N, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done_N)

    def body(state):
        step, token_N, done_N, tokens_NR, cache, rng = state
        logits_N1V, _, cache = model.apply(
            {"params": params}, token_N[:, None],
            positions=jnp.full((N, 1), prompt_len - 1, jnp.int32) + step,
            segment_ids=jnp.ones((N, 1), jnp.int32), cache=cache)
        rng, step_rng = jax.random.split(rng)
        token_N, done_N = pick(logits_N1V[:, 0], done_N, step_rng)
        return step + 1, token_N, done_N, tokens_NR.at[:, step].set(token_N), cache, rng

    steps, *_, tokens_NR, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), token_N, done_N, tokens_NR, cache, rng))
    return tokens_NR, steps


class SamplingEngine:
    """Our sampler on the current params: the RL scripts' `generate` call (temperature 0:
    greedy, as `generate(do_sample=False)`)."""

    def __init__(self, config: ModelConfig, tokenizer, seed: int, temperature: float = TEMPERATURE,
                 top_k: int = TOP_K, top_p: float = TOP_P):
        self.config, self.tokenizer = config, tokenizer
        self.key = jax.random.PRNGKey(seed)
        self.greedy = temperature == 0
        self.scalars = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k),
                        "top_p": jnp.float32(top_p), "repetition_penalty": jnp.float32(1.0)}

    def rollout(self, params, prompt_ids: np.ndarray, mask: np.ndarray, num_generations: int,
                max_new_tokens: int, step: int) -> Rollout:
        ids = np.repeat(prompt_ids, num_generations, axis=0)
        rows_mask = np.repeat(mask, num_generations, axis=0)
        P = ids.shape[1]
        extra = ((0, 0), (0, prompt_width(P) - P))  # padding after the prompts: unseen
        tokens, steps = _sample(params, jnp.asarray(np.pad(ids, extra)),
                                jnp.asarray(np.pad(rows_mask, extra)), jnp.int32(P),
                                jax.random.fold_in(self.key, step), self.scalars,
                                jnp.int32(self.tokenizer.eos_id), config=self.config,
                                max_new_tokens=max_new_tokens, greedy=self.greedy)
        tokens = np.asarray(tokens)[:, :int(steps)]
        return _finish(np.concatenate([ids, tokens], axis=1), ids.shape[1], self.tokenizer)


class ReplayEngine:
    """A reference run's sampled ids: `outputs[step]` is that step's [N, P + R] output_ids."""

    def __init__(self, outputs: Sequence[np.ndarray], tokenizer):
        self.outputs, self.tokenizer = list(outputs), tokenizer

    def rollout(self, params, prompt_ids: np.ndarray, mask: np.ndarray, num_generations: int,
                max_new_tokens: int, step: int) -> Rollout:
        del params, mask, max_new_tokens
        if step >= len(self.outputs):
            raise UserError(f"replay: the recording holds {len(self.outputs)} steps, the run "
                            f"asked for step {step + 1}")
        output_ids = np.asarray(self.outputs[step])
        expected = np.repeat(prompt_ids, num_generations, axis=0)
        P = prompt_ids.shape[1]
        if output_ids.shape[0] != expected.shape[0] or not np.array_equal(
                output_ids[:, :P], expected):
            raise UserError(f"replay: step {step + 1}'s recorded prompts differ from this run's "
                            "(another data file, order, seed or tokenizer?)")
        return _finish(output_ids, P, self.tokenizer)


class ScriptEngine:
    """Canned completions: row n of every step gets `texts[n % len(texts)]`, then EOS."""

    def __init__(self, texts: Sequence[str], tokenizer):
        if not texts:
            raise UserError("script: no completions given")
        self.texts, self.tokenizer = list(texts), tokenizer

    def rollout(self, params, prompt_ids: np.ndarray, mask: np.ndarray, num_generations: int,
                max_new_tokens: int, step: int) -> Rollout:
        del params, mask, step
        ids = np.repeat(prompt_ids, num_generations, axis=0)
        eos = self.tokenizer.eos_id
        completions = [(self.tokenizer.encode(self.texts[n % len(self.texts)])
                        [:max_new_tokens - 1] + [eos]) for n in range(len(ids))]
        width = max(len(c) for c in completions)
        tail = np.full((len(ids), width), eos, np.int32)
        for n, completion in enumerate(completions):
            tail[n, :len(completion)] = completion
        return _finish(np.concatenate([ids, tail], axis=1), ids.shape[1], self.tokenizer)
