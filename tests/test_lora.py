"""LoRA in the model (model.lora, transformer.LoRADense): off by default, adapters on the
square projections only, an exact no-op at init (B = 0), y = x K + (x A) B with no scaling,
and the references' adapter key names / layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.model import lora
from minimind_jax.model.config import ModelConfig, arch_defaults
from minimind_jax.model.transformer import MiniMind, init_params
from tests.helpers import FIXTURES

POST = FIXTURES / "post"
M2 = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=64)
M3 = arch_defaults("minimind3").replace(dim=64, n_layers=2, max_seq_len=64)


def _logits(config, params, ids):
    return MiniMind(config).apply({"params": params}, ids)[0]


@pytest.mark.parametrize("base", [M2, M3], ids=["minimind2", "minimind3"])
def test_adapters_only_on_square_projections_and_start_as_noop(base):
    config = base.replace(lora_rank=16)
    params = init_params(config, 0)
    adapters, plain = lora.split(params)
    paths = {tuple(k.key for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert paths == {(f"layers_{i}", "attention", w, leaf) for i in range(2)
                     for w in ("wq", "wo") for leaf in ("lora_A", "lora_B")}
    a = adapters["layers_0"]["attention"]["wq"]["lora_A"]
    assert a.shape == (64, 16) and abs(float(np.std(a)) - 0.02) < 0.003
    assert not np.any(adapters["layers_0"]["attention"]["wq"]["lora_B"])
    # the base tree is exactly a lora_rank 0 tree, and B = 0 gives its logits bit for bit
    assert jax.tree.structure(plain) == jax.tree.structure(init_params(base, 0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 6400, (2, 12)))
    np.testing.assert_array_equal(_logits(config, params, ids), _logits(base, plain, ids))
    assert jax.tree.structure(lora.join(adapters, plain)) == jax.tree.structure(params)


def test_adapter_adds_x_a_b_without_scaling():
    config = M2.replace(lora_rank=4)
    params = jax.tree.map(np.asarray, init_params(config, 1))
    rng = np.random.default_rng(1)
    for i in range(2):
        for w in ("wq", "wo"):
            params[f"layers_{i}"]["attention"][w]["lora_B"] = rng.normal(
                0, 0.1, (4, 64)).astype(np.float32)
    ids = jnp.asarray(rng.integers(0, 6400, (2, 12)))
    merged = lora.merged(params, config)
    got = _logits(config, params, ids)
    want = _logits(M2, merged, ids)
    assert float(jnp.abs(got - _logits(M2, lora.split(params)[1], ids)).max()) > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("case,base", [("m2_lora", M2), ("m3_lora", M3)])
def test_adapter_state_dict_round_trip_with_reference_keys(case, base):
    config = base.replace(lora_rank=16)
    golden = np.load(POST / f"{case}.npz")
    ref = {k.removeprefix("lora_final/"): golden[k] for k in golden.files
           if k.startswith("lora_final/")}
    adapters = lora.adapters_from_state_dict(ref, config, case)
    back = lora.adapter_state_dict(adapters, config)
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])
    # scanned layers: same file
    scanned = config.replace(scan_layers=True)
    stacked = lora.adapters_from_state_dict(ref, scanned, case)
    assert stacked["layers"]["block"]["attention"]["wq"]["lora_A"].shape == (2, 64, 16)
    again = lora.adapter_state_dict(stacked, scanned)
    for k in ref:
        np.testing.assert_array_equal(again[k], ref[k])
    with pytest.raises(Exception, match="missing"):
        lora.adapters_from_state_dict({}, config, "empty")


@pytest.mark.parametrize("case,base", [("m2_lora", M2), ("m3_lora", M3)])
def test_reads_the_references_adapter_files(case, base):
    pytest.importorskip("torch")
    config = base.replace(lora_rank=16)
    adapters = lora.load_adapters(POST / f"{case}_saved_adapter.pth", config)
    golden = np.load(POST / f"{case}.npz")
    back = lora.adapter_state_dict(adapters, config)
    for k in back:
        np.testing.assert_array_equal(back[k], golden[f"lora_saved/{k}"].astype(np.float32))


def test_merge_in_float16_as_minimind3():
    """minimind-3's merge_lora: fp16(W) + fp16(B A), the sum rounded to float16."""
    config = M3.replace(lora_rank=16)
    golden = np.load(POST / "m3_lora.npz")
    adapters = lora.adapters_from_state_dict(
        {k.removeprefix("lora_final/"): golden[k] for k in golden.files
         if k.startswith("lora_final/")}, config, "m3_lora")
    params = lora.join(adapters, jax.tree.map(np.asarray, lora.split(init_params(config, 0))[1]))
    exact, half = lora.merged(params, config), lora.merged(params, config, fp16=True)
    wq = params["layers_0"]["attention"]["wq"]
    a, b = golden["lora_final/model.layers.0.self_attn.q_proj.lora.A.weight"], \
        golden["lora_final/model.layers.0.self_attn.q_proj.lora.B.weight"]
    w_ref = wq["kernel"].T  # torch layout [out, in]
    want16 = (w_ref.astype(np.float16) + (b @ a).astype(np.float16)).astype(np.float32)
    np.testing.assert_array_equal(half["layers_0"]["attention"]["wq"]["kernel"].T, want16)
    np.testing.assert_allclose(exact["layers_0"]["attention"]["wq"]["kernel"].T, w_ref + b @ a,
                               atol=1e-6)
    assert "lora_A" not in exact["layers_0"]["attention"]["wq"]
