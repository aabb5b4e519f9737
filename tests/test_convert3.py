"""minimind-3 weights: HEAD's .pth files (float16 weights, *_resume.pth), our export to them,
`generate --ckpt` on them, and the Hugging Face Qwen3 export checked against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import convert
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from tests.helpers import TOKENIZER3_DIR, golden_state_dict
from tests.test_model3 import CONFIGS

torch = pytest.importorskip("torch")


def _head_files(tmp_path, golden3, name):
    """HEAD's two files for weights `name`: pretrain_64.pth (fp16 state dict, lm_head tied)
    and checkpoints/pretrain_64_resume.pth ({'model': ..., 'optimizer': ..., ...})."""
    sd = {k: torch.from_numpy(v).half() for k, v in golden_state_dict(golden3, name).items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    weights = tmp_path / "pretrain_64.pth"
    torch.save(sd, weights)
    resume = tmp_path / "pretrain_64_resume.pth"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 1, "step": 20,
                "world_size": 1, "wandb_id": None}, resume)
    return weights, resume


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_head_pth_files_load_with_config_inferred(tmp_path, golden3, name):
    weights, resume = _head_files(tmp_path, golden3, f"{name}/init/")
    expected = {k: v.astype(np.float16).astype(np.float32)
                for k, v in golden_state_dict(golden3, f"{name}/init/").items()}
    for path in (weights, resume):
        params, config, _ = convert.load_weights(path, ModelConfig())  # a MiniMind2 base
        assert config == CONFIGS[name].replace(max_seq_len=512), config
        got = convert.state_dict_from_params(params, config)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_export_to_head_pth_round_trip(tmp_path, golden3):
    config = CONFIGS["moe"]
    sd = golden_state_dict(golden3, "moe/init/")
    params = convert.params_from_state_dict(sd, config)
    out = tmp_path / "ours.pth"
    convert.save_state_dict(convert.state_dict_from_params(params, config), out)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(sd)
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    for key, value in sd.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_generate_from_head_pth(tmp_path, golden3, capsys):
    weights, _ = _head_files(tmp_path, golden3, "dense/init/")
    assert cli.main(["generate", "--ckpt", str(weights), "--tokenizer", str(TOKENIZER3_DIR),
                     "--prompt", "你好", "--temperature", "0", "--max_new_tokens", "4"]) == 0
    assert "你好" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_hf_qwen3_export_matches_transformers(tmp_path, golden3, name):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        pytest.skip("transformers without Qwen3 (needs >= 4.51)")
    config = CONFIGS[name]
    params = convert.params_from_state_dict(golden_state_dict(golden3, f"{name}/init/"), config)
    out = convert.export_hf_qwen3(params, config, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == ("Qwen3MoeForCausalLM" if name == "moe"
                                    else "Qwen3ForCausalLM")
    ids = golden3["pre_input_ids"][:2, :16]
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    ours, _ = MiniMind(config).apply({"params": params}, jnp.asarray(ids))
    diff = float(np.abs(theirs - np.asarray(ours)).max())
    head = float(np.abs(theirs - golden3[f"{name}/logits"]).max())
    print(f"{name}: transformers vs ours {diff:.3g}, transformers vs HEAD golden {head:.3g}")
    assert diff < 1e-4 and head < 1e-4, (diff, head)
