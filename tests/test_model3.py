"""minimind-3 (upstream HEAD d65ef2c) architecture against its golden logits, through the same
model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.model.config import arch_defaults, preset
from minimind_jax.model.transformer import MiniMind, count_params, init_cache, init_params
from minimind_jax.model.weights import params_from_state_dict, state_dict_from_params
from tests.helpers import assert_within, golden_state_dict, max_abs_diff

TINY_MINIMIND3 = arch_defaults("minimind3").replace(dim=64, n_layers=2, max_seq_len=64)
TINY_MINIMIND3_MOE = TINY_MINIMIND3.replace(use_moe=True)
CONFIGS = {"dense": TINY_MINIMIND3, "moe": TINY_MINIMIND3_MOE}


def _golden_params(minimind3_golden, name, config):
    return params_from_state_dict(golden_state_dict(minimind3_golden, f"{name}/init/"), config)


@pytest.mark.parametrize("name,changes", [
    ("dense", {}), ("dense", {"attention_impl": "xla", "scan_layers": True, "remat": True}),
    ("moe", {}), ("moe", {"moe_impl": "dense"}), ("moe", {"remat": True}),
    ("moe", {"moe_impl": "ragged", "attention_impl": "xla"})])
def test_golden_logits(minimind3_golden, name, changes):
    config = CONFIGS[name].replace(**changes)
    params = _golden_params(minimind3_golden, name, config)
    ids = minimind3_golden["pre_input_ids"][:2, :16]
    logits, _ = jax.jit(MiniMind(config).apply)({"params": params}, jnp.asarray(ids))
    assert_within(f"{name} {changes} logits",
                  max_abs_diff(logits, minimind3_golden[f"{name}/logits"]),
                  1.3e-6)  # about 3x the 4.2e-7 measured


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_state_dict_round_trip_uses_minimind3_names(minimind3_golden, name):
    config = CONFIGS[name]
    expected = golden_state_dict(minimind3_golden, f"{name}/init/")
    got = state_dict_from_params(_golden_params(minimind3_golden, name, config), config)
    assert set(got) == set(expected)
    assert len(got) == (25 if name == "dense" else 45)  # SPEC3: lm_head.weight included
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_parameter_counts_match_spec3():
    """SPEC3 section 1's counts (tied matrix once)."""
    shapes = {"minimind3": 63_912_192, "minimind3-moe": 198_416_640}
    for name, expected in shapes.items():
        params = jax.eval_shape(lambda name=name: init_params(preset(name), 0))
        assert count_params(params) == expected, name
    for config, expected in ((TINY_MINIMIND3, 532_832), (TINY_MINIMIND3_MOE, 828_256)):
        assert count_params(jax.eval_shape(lambda c=config: init_params(c, 0))) == expected


def test_init_is_normal_002():
    """minimind-3's post_init: every matrix ~ N(0, 0.02^2), norms (q/k norm too) = 1 (the MoE
    router and experts take the same `kernel_init`)."""
    sd = state_dict_from_params(init_params(TINY_MINIMIND3, 0), TINY_MINIMIND3)
    for key, value in sd.items():
        if key.endswith("norm.weight") or "layernorm" in key:
            assert np.all(value == 1), key
        elif value.size > 1000:
            assert abs(value.std() - 0.02) < 0.002 and abs(value.mean()) < 0.002, key


@pytest.mark.parametrize("name,changes", [("dense", {}),
                                          ("moe", {"moe_impl": "ragged", "scan_layers": True})])
def test_kv_cache_prefill_decode_equals_full_forward(minimind3_golden, name, changes):
    config = CONFIGS[name].replace(**changes)
    params = _golden_params(minimind3_golden, name, CONFIGS[name])
    if config.scan_layers:
        from minimind_jax.model.weights import stack_layers

        params = stack_layers(jax.device_get(params), config.n_layers)
    ids = jnp.asarray(minimind3_golden["pre_input_ids"][:2, :12])
    apply = jax.jit(MiniMind(config).apply)
    full, _ = apply({"params": params}, ids)
    cache = init_cache(config, 2, 16)
    logits, _, cache = apply({"params": params}, ids[:, :8], cache=cache)
    steps = [logits]
    for t in range(8, 12):
        step_logits, _, cache = apply({"params": params}, ids[:, t:t + 1], cache=cache)
        steps.append(step_logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_batch_aux_loss_is_minimind3s_formula(minimind3_golden):
    """The MoE aux of the init model on a batch equals SPEC3's formula recomputed in numpy."""
    config = TINY_MINIMIND3_MOE
    params = _golden_params(minimind3_golden, "moe", config)
    ids = jnp.asarray(minimind3_golden["pre_input_ids"][:3, :20])
    (_, aux), state = jax.jit(lambda p, x: MiniMind(config).apply(
        {"params": p}, x, capture_intermediates=lambda m, _: m.name == "ffn_norm"))(params, ids)
    expected = 0.0
    for i in range(config.n_layers):
        x = np.asarray(state["intermediates"][f"layers_{i}"]["ffn_norm"]["__call__"][0])
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        z = x @ minimind3_golden[f"moe/init/model.layers.{i}.mlp.gate.weight"].T.astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        f = np.bincount(p.argmax(-1), minlength=4) / len(p)
        expected += 5e-4 * 4 * np.sum(f * p.mean(0))
    assert_within("moe aux vs the formula", abs(float(aux) - expected), 6e-10)
