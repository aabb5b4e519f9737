"""Our sampler against minimind-3's own `generate` (upstream HEAD d65ef2c,
model/model_minimind.py L256-288, copied unmodified into tests/fixtures/minimind3_model/), which
its RL scripts call with temperature 0.8 and its defaults top_k 50, top_p 0.85
(shared/SPEC_RL.md 1.2 and 8):

- the filter: fixed logits through the reference `generate` with its `forward` stubbed, the
  probabilities it hands `torch.multinomial` captured, against the softmax of our
  `filter_top_k_top_p` on the same logits / temperature (as `next_token` divides them);
- greedy: the reference model and ours with the same tiny random weights, `generate(do_sample=
  False)` on a left-padded batch against rollout's KV-cache decoder in greedy mode.

Ties at the top-p boundary: the reference keeps the tied tokens in `torch.sort`'s order, and
torch's default (unstable) CPU sort keeps equal values in index order only for rows of at most
16 (measured, torch 2.13); ours keeps them in index order, as a stable sort does. So the tie
cases with an exact support are 16-token rows (checked stable below), and a 6400-token row
with ties at the boundary checks what is order-independent: as many tied tokens kept, with the
same probabilities, and the same support everywhere else."""

import functools
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.infer.rollout import TEMPERATURE, TOP_K, TOP_P, SamplingEngine
from minimind_jax.infer.sampling import filter_top_k_top_p
from minimind_jax.model.weights import params_from_state_dict
from tests.helpers import REPO_ROOT
from tests.test_model3 import TINY_MINIMIND3

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REFERENCE = REPO_ROOT / "tests" / "fixtures" / "minimind3_model" / "model_minimind.py"
PROB_TOLERANCE = 1e-6  # measured max |diff| 7.5e-8 (random 6400-token rows)
V = 6400


@functools.cache
def reference():
    """The reference model file as a module, executed from its text (nothing written next to
    the fixture)."""
    module = types.ModuleType("minimind3_reference_model_minimind")
    module.__file__ = str(REFERENCE)
    sys.modules[module.__name__] = module
    exec(compile(REFERENCE.read_text(), str(REFERENCE), "exec"), module.__dict__)
    return module


def reference_model(**config):
    ref = reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers on `rope_scaling`
        return ref.MiniMindForCausalLM(ref.MiniMindConfig(**config)).eval()


def reference_probs(logits_BV: np.ndarray, monkeypatch, **sampling) -> np.ndarray:
    """The distribution the reference `generate` samples the next token from, given these
    logits at the last position: `forward` returns them, `torch.multinomial` records its input
    (and returns token 0)."""
    B, vocab = logits_BV.shape
    model = reference_model(hidden_size=16, num_hidden_layers=1, vocab_size=vocab,
                            max_position_embeddings=8)
    logits = torch.from_numpy(logits_BV)[:, None, :]
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: types.SimpleNamespace(
        logits=logits.clone(), past_key_values=None))
    captured = []

    def multinomial(probs, num_samples):
        captured.append(probs.detach().clone())
        return torch.zeros((probs.shape[0], num_samples), dtype=torch.long)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    model.generate(torch.ones((B, 1), dtype=torch.long), max_new_tokens=1, eos_token_id=None,
                   temperature=sampling.pop("temperature", TEMPERATURE), **sampling)
    assert len(captured) == 1
    return captured[0].numpy()


def our_probs(logits_BV: np.ndarray, temperature=TEMPERATURE, top_k=TOP_K,
              top_p=TOP_P) -> np.ndarray:
    tempered = jnp.asarray(logits_BV) / jnp.float32(temperature)  # as next_token divides
    filtered = filter_top_k_top_p(tempered, jnp.int32(top_k), jnp.float32(top_p))
    return np.asarray(jax.nn.softmax(filtered, axis=-1))


def compare(logits_BV, monkeypatch, **sampling):
    """(reference, ours, max |diff|) after checking the distributions agree: same support,
    probabilities within PROB_TOLERANCE."""
    theirs = reference_probs(logits_BV, monkeypatch, **dict(sampling))
    ours = our_probs(logits_BV, **sampling)
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    diff = float(np.abs(ours - theirs).max())
    assert diff <= PROB_TOLERANCE, diff
    return theirs, ours, diff


def random_logits(rows, seed, scale=3.0):
    return (np.random.default_rng(seed).normal(size=(rows, V)) * scale).astype(np.float32)


def test_random_logits_several_rows(monkeypatch):
    theirs, _, _ = compare(random_logits(4, 0), monkeypatch)
    kept = (theirs > 0).sum(-1)
    assert np.all((kept > 1) & (kept < TOP_K))  # top-p cut inside the top 50 on every row
    flat = random_logits(3, 1, scale=0.3)  # flat rows: top-p cuts into what top-k 50 kept
    theirs, _, _ = compare(flat, monkeypatch)
    assert np.all(((theirs > 0).sum(-1) > 30) & ((theirs > 0).sum(-1) < TOP_K))
    assert np.all((our_probs(flat, top_k=0) > 0).sum(-1) > 1000)


def test_ties_at_the_kth_logit_all_stay(monkeypatch):
    logits = random_logits(2, 2, scale=0.3)
    for row in logits:
        order = np.argsort(-row)
        row[order[47:53]] = row[order[47]]  # the 48th..53rd likeliest tie: k-th value tied
    compare(logits, monkeypatch)
    theirs, _, _ = compare(logits, monkeypatch, top_p=1.0)  # top-k alone
    assert np.all((theirs > 0).sum(-1) == 53)


def test_one_token_above_top_p(monkeypatch):
    logits = random_logits(2, 3)
    logits[0, 17] = 30.0
    logits[1, 4000] = logits[1].max() + 3.0  # ~0.9 after temperature 0.8
    theirs, _, _ = compare(logits, monkeypatch)
    assert (theirs[0] > 0).sum() == 1 and theirs[0, 17] == 1.0
    assert (theirs[1] > 0).sum() == 1 and theirs[1, 4000] == 1.0


def test_top_k_larger_than_the_support(monkeypatch):
    logits = np.full((2, V), -np.inf, np.float32)
    logits[0, [3, 70, 900, 5000]] = [1.0, 0.5, 0.25, 2.0]
    logits[1, 100:130] = np.linspace(0, 1, 30, dtype=np.float32)
    compare(logits, monkeypatch)
    compare(logits, monkeypatch, top_p=1.0)  # no top-p: all 4 / 30 finite tokens stay
    assert (our_probs(logits, top_p=1.0) > 0).sum() == 34


def _stable_sort(row):
    values = torch.from_numpy(row)
    return torch.equal(torch.sort(values, descending=True)[1],
                       torch.sort(values, descending=True, stable=True)[1])


@pytest.mark.parametrize("top_p,kept", [(0.25, 2), (0.3, 2), (0.5, 3), (0.75, 4), (0.99, 4)])
def test_ties_at_the_top_p_boundary(monkeypatch, top_p, kept):
    """Four tokens tied at 1/4 each (exact): the reference keeps a tied token when the ones
    sorted before it hold at most top_p, so an exact 0.5 keeps the third; the rule is not
    "keep every tie" nor "the mass before < p". 16-token rows, top_k 0 (torch.topk needs
    k <= vocab)."""
    logits = np.full((2, 16), -np.inf, np.float32)
    logits[0, [1, 5, 9, 12]] = 0.0
    logits[1, [0, 2, 3, 15]] = 1.5
    logits[1, [7, 8]] = -20.0  # far below: mass ~1e-7
    assert all(_stable_sort(row) for row in logits)
    theirs, _, _ = compare(logits, monkeypatch, top_k=0, top_p=top_p)
    assert (theirs[0] > 0).sum() == kept
    assert np.flatnonzero(theirs[0]).tolist() == [1, 5, 9, 12][:kept]  # index order


def test_ties_at_the_top_p_boundary_large_vocab(monkeypatch):
    """6400 tokens, eight tied at the largest logit, top_p inside the tie: the same number kept
    with the same probabilities; which of the tied ones depends on torch's unstable sort."""
    logits = random_logits(1, 4, scale=1.0)
    tied = np.random.default_rng(5).choice(V, 8, replace=False)
    logits[0, tied] = logits.max() + 0.5
    per_token = float(jax.nn.softmax(logits[0] / TEMPERATURE)[tied[0]])
    top_p = 3.5 * per_token  # the boundary falls inside the tie: 4 of the 8 stay
    theirs = reference_probs(logits, monkeypatch, top_k=0, top_p=top_p)
    ours = our_probs(logits, top_k=0, top_p=top_p)
    assert (theirs > 0).sum() == 4
    assert (ours > 0).sum() == 4
    np.testing.assert_allclose(np.sort(ours[0]), np.sort(theirs[0]), rtol=0,
                               atol=PROB_TOLERANCE)
    assert set(np.flatnonzero(ours[0])) <= set(tied)
    assert set(np.flatnonzero(theirs[0])) <= set(tied)
    compare(logits, monkeypatch, top_k=0, top_p=0.5)  # boundary below the tie: all kept


def test_greedy_left_padded_batch_equals_reference_generate():
    """Same random weights (hidden 64, 2 layers), two prompts of 9 and 5 tokens left-padded with
    attention_mask, 16 new tokens: `generate(do_sample=False)` with the KV cache (positions the
    column index, padding masked) and rollout's decoder in greedy mode pick the same ids.
    (RoPE is relative, so positions rebased per row would give the same ids up to rounding:
    measured equal too; what this pins is the padding mask, the cache and the argmax.)"""
    torch.manual_seed(0)
    model = reference_model(hidden_size=64, num_hidden_layers=2)
    with torch.no_grad():  # weights x10 (std 0.2): varied ids, top-2 logit gaps >= 0.012
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.mul_(10.0)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(6)
    prompt_ids = np.zeros((2, 9), np.int64)
    prompt_ids[0] = rng.integers(3, V, 9)
    prompt_ids[1, 4:] = rng.integers(3, V, 5)
    mask = (prompt_ids != 0).astype(np.int64)
    new = 16
    expected = model.generate(torch.from_numpy(prompt_ids),
                              attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                              do_sample=False, temperature=TEMPERATURE, eos_token_id=2).numpy()
    assert expected.shape == (2, 9 + new)

    class Tokenizer:
        eos_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    config = TINY_MINIMIND3
    params = params_from_state_dict(state, config)
    engine = SamplingEngine(config, Tokenizer(), seed=0, temperature=0.0)
    got = engine.rollout(params, prompt_ids.astype(np.int32), mask.astype(np.int32),
                         num_generations=1, max_new_tokens=new, step=0)
    np.testing.assert_array_equal(got.output_ids, expected)
    assert len(set(got.completion_ids[0].tolist())) > 3  # not one token repeated
    # the RL default (sampled) path, made deterministic by top_k 1: the same ids
    sampled = SamplingEngine(config, Tokenizer(), seed=0, top_k=1).rollout(
        params, prompt_ids.astype(np.int32), mask.astype(np.int32), num_generations=1,
        max_new_tokens=new, step=0)
    np.testing.assert_array_equal(sampled.output_ids, expected)


def test_padding_after_the_prompts_changes_no_completion():
    """The sampler pads a batch of prompts on the right to a power of two (a few programs for
    prompts of any length); those columns are unseen, so a wider padding samples the same ids
    (the same rng, left-padded rows, a random tiny model)."""
    from minimind_jax.infer import rollout
    from minimind_jax.model.transformer import init_params

    config = TINY_MINIMIND3
    params = init_params(config, 3)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, (3, 11)).astype(np.int32)
    ids[1, :4] = 0  # left padding
    mask = (ids != 0).astype(np.int32)
    scalars = {"temperature": jnp.float32(TEMPERATURE), "top_k": jnp.int32(TOP_K),
               "top_p": jnp.float32(TOP_P), "repetition_penalty": jnp.float32(1.0)}
    assert rollout.prompt_width(11) == 16 and rollout.prompt_width(3) == 16
    assert rollout.prompt_width(17) == 32

    def sample(width):
        extra = ((0, 0), (0, width - 11))
        tokens, steps = rollout._sample(params, np.pad(ids, extra), np.pad(mask, extra),
                                        jnp.int32(11), jax.random.PRNGKey(5), scalars,
                                        jnp.int32(2), config=config, max_new_tokens=24)
        return np.asarray(tokens)[:, :int(steps)]

    exact = sample(11)
    assert exact.shape[1] > 4
    for width in (16, 40):
        np.testing.assert_array_equal(sample(width), exact)


def test_the_decode_loop_does_not_copy_the_cache():
    """A cached call orders its cache writes after its reads (transformer's optimization
    barrier): without it XLA copied every layer's cached keys and values twice per decode step
    (16 copies for these 4 layers, 4 with it: measured), ~1.3 GB a step at minimind-3's shape."""
    import re

    from minimind_jax.infer import rollout
    from minimind_jax.model.transformer import init_params

    config = TINY_MINIMIND3.replace(n_layers=4)
    N, P, R = 3, 8, 40
    params = jax.eval_shape(lambda: init_params(config, 0))
    scalars = {"temperature": jnp.float32(TEMPERATURE), "top_k": jnp.int32(TOP_K),
               "top_p": jnp.float32(TOP_P), "repetition_penalty": jnp.float32(1.0)}
    ids = jax.ShapeDtypeStruct((N, P), jnp.int32)
    hlo = rollout._sample.lower(params, ids, ids, jnp.int32(P), jax.random.PRNGKey(0), scalars,
                                jnp.int32(2), config=config, max_new_tokens=R).compile().as_text()
    K, H, S = config.n_kv_heads, config.head_dim, P + R
    copies = re.findall(rf"f32\[{N},{K},(?:{H},{S}|{S},{H})\]\{{[^}}]*\}} copy\(", hlo)
    assert len(copies) < 2 * config.n_layers, f"{len(copies)} copies of cached keys or values"
