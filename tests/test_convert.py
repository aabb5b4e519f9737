"""State-dict round trips, bad files, and Hugging Face Llama export checked with transformers."""

import numpy as np
import pytest

from minimind_jax.cli import main
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.convert import export_hf_llama
from minimind_jax.model.transformer import MiniMind, init_params
from minimind_jax.model.weights import (
    infer_config,
    load_state_dict,
    load_weights,
    params_from_state_dict,
    save_state_dict,
    state_dict_from_params,
)
from tests.helpers import TINY_CONFIG, assert_within, golden_state_dict, max_abs_diff


@pytest.mark.parametrize("name,config", [("dense", TINY_CONFIG),
                                         ("moe", TINY_CONFIG.replace(use_moe=True)),
                                         ("dense", TINY_CONFIG.replace(scan_layers=True))])
def test_state_dict_round_trip_is_lossless(golden, name, config):
    sd = golden_state_dict(golden, f"{name}/init/")
    back = state_dict_from_params(params_from_state_dict(sd, config), config)
    assert set(back) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_file_formats_round_trip(tmp_path, golden, suffix):
    if suffix == ".pth":
        pytest.importorskip("torch")
    sd = golden_state_dict(golden, "dense/init/")
    path = tmp_path / f"w{suffix}"
    save_state_dict(sd, path)
    loaded = load_state_dict(path)
    for key in sd:
        np.testing.assert_array_equal(loaded[key], sd[key])


def test_either_tied_key_is_accepted(golden):
    sd = golden_state_dict(golden, "dense/init/")
    only_output = {k: v for k, v in sd.items() if k != "tok_embeddings.weight"}
    a = params_from_state_dict(sd, TINY_CONFIG)
    b = params_from_state_dict(only_output, TINY_CONFIG)
    np.testing.assert_array_equal(a["tok_embeddings"], b["tok_embeddings"])


def test_bad_state_dict_lists_missing_unexpected_misshaped(golden):
    sd = golden_state_dict(golden, "dense/init/")
    del sd["layers.1.attention.wq.weight"]
    sd["layers.0.extra.weight"] = np.zeros(3)
    sd["norm.weight"] = np.ones(65, np.float32)
    with pytest.raises(UserError) as err:
        params_from_state_dict(sd, TINY_CONFIG, source="bad.pth")
    text = str(err.value)
    assert "bad.pth" in text
    assert "missing keys (1): layers.1.attention.wq.weight" in text
    assert "unexpected keys (1): layers.0.extra.weight" in text
    assert "norm.weight: got (65,), expected (64,)" in text


def test_wrong_config_is_an_error_not_a_silent_init(golden):
    sd = golden_state_dict(golden, "dense/init/")
    with pytest.raises(UserError, match="mis-shaped"):
        params_from_state_dict(sd, TINY_CONFIG.replace(dim=128))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "w.txt"
    bad.write_text("x")
    with pytest.raises(UserError, match="unknown weights format"):
        load_state_dict(bad)
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not read"):
        load_state_dict(corrupt)


def test_junk_pth_names_what_was_expected(tmp_path):
    """torch's unpickler trips on junk with KeyError, IndexError, UnicodeDecodeError... (one
    in ten random files in the CI run that found it): each is the same kind of line."""
    pytest.importorskip("torch")
    junk = tmp_path / "junk.pth"
    rng = np.random.default_rng(0)
    for _ in range(200):
        junk.write_bytes(rng.bytes(256))
        with pytest.raises(UserError, match=r"as a PyTorch state dict: not a plain dict of "
                                            r"tensors as torch\.save writes it \(\w+"):
            load_state_dict(junk)


def test_load_weights_of_a_file(tmp_path, golden):
    """Shapes inferred on top of the given config, `dtype` the compute dtype; `exact` numpy."""
    path = tmp_path / "ref.npz"
    save_state_dict(golden_state_dict(golden, "dense/init/"), path)
    params, config, origin = load_weights(path, ModelConfig(n_heads=4), dtype="bfloat16")
    assert (config.dim, config.n_layers, config.dtype, origin) == (64, 2, "bfloat16", str(path))
    exact, same, _ = load_weights(path, config, exact=True)
    assert same == config and isinstance(exact["norm"]["weight"], np.ndarray)
    np.testing.assert_array_equal(exact["norm"]["weight"], params["norm"]["weight"])
    with pytest.raises(UserError, match="mis-shaped"):
        load_weights(path, config.replace(dim=128), exact=True)


def test_infer_config_from_weights(golden):
    config = infer_config(golden_state_dict(golden, "moe/init/"), ModelConfig(n_heads=4))
    assert (config.dim, config.n_layers, config.n_kv_heads, config.hidden_dim) == (64, 2, 2, 192)
    assert config.use_moe and config.n_routed_experts == 4 and config.n_shared_experts == 1


def test_hf_llama_export_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = init_params(TINY_CONFIG, 7)
    out = export_hf_llama(params, TINY_CONFIG, tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 6400, (2, 20))
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    ours, _ = MiniMind(TINY_CONFIG).apply({"params": params}, ids)
    assert_within("Llama export: transformers vs ours", max_abs_diff(theirs, ours),
                  3.9e-6)  # about 3x the 1.3e-6 measured


def test_convert_cli(tmp_path, golden, capsys):
    src = tmp_path / "ref.npz"
    save_state_dict(golden_state_dict(golden, "dense/init/"), src)
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--n_heads", "4"]) == 0
    back = load_state_dict(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(back["layers.0.attention.wq.weight"],
                                  golden["dense/init/layers.0.attention.wq.weight"])
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.npz")]) == 2
    assert "weights not found" in capsys.readouterr().err
