"""minimind-3 weights: its .pth files (float16 weights, *_resume.pth), our export to them,
`generate --ckpt` on them, and the Hugging Face Qwen3 export checked against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import convert, weights
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    answer_by_hf_tokenizers,
    assert_within,
    golden_state_dict,
    greedy_by_recomputation,
    max_abs_diff,
)
from tests.test_model3 import CONFIGS

torch = pytest.importorskip("torch")


def _minimind3_files(tmp_path, minimind3_golden, name):
    """minimind-3's two files for weights `name`: pretrain_64.pth (fp16 state dict, lm_head tied)
    and checkpoints/pretrain_64_resume.pth ({'model': ..., 'optimizer': ..., ...})."""
    golden = golden_state_dict(minimind3_golden, name)
    sd = {k: torch.from_numpy(v).half() for k, v in golden.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    weights_file = tmp_path / "pretrain_64.pth"
    torch.save(sd, weights_file)
    resume = tmp_path / "pretrain_64_resume.pth"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 1, "step": 20,
                "world_size": 1, "wandb_id": None}, resume)
    return weights_file, resume


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_minimind3_pth_files_load_with_config_inferred(tmp_path, minimind3_golden, name):
    weights_file, resume = _minimind3_files(tmp_path, minimind3_golden, f"{name}/init/")
    expected = {k: v.astype(np.float16).astype(np.float32)
                for k, v in golden_state_dict(minimind3_golden, f"{name}/init/").items()}
    for path in (weights_file, resume):
        params, config, _ = weights.load_weights(path, ModelConfig())  # a MiniMind2 base
        assert config == CONFIGS[name].replace(max_seq_len=512), config
        got = weights.state_dict_from_params(params, config)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_export_to_minimind3_pth_round_trip(tmp_path, minimind3_golden):
    config = CONFIGS["moe"]
    sd = golden_state_dict(minimind3_golden, "moe/init/")
    params = weights.params_from_state_dict(sd, config)
    out = tmp_path / "ours.pth"
    weights.save_state_dict(weights.state_dict_from_params(params, config), out)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(sd)
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    for key, value in sd.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_generate_from_minimind3_pth(tmp_path, minimind3_golden, capsys):
    """`generate` on a minimind-3 float16 .pth prints the text of the greedy tokens that a full
    recomputation per token (no cache) of the same float16-rounded weights gives. The weights
    are the reference's init with the linear layers scaled 8x: as they are, the model says
    "\\n" over and over, which a decoder that got positions wrong says too."""
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.infer.generate import encode_prompt

    sharp = {f"sharp/{k}": v * 8 if k.endswith("proj.weight") else v
             for k, v in golden_state_dict(minimind3_golden, "dense/init/").items()
             if k != "lm_head.weight"}
    weights_file, _ = _minimind3_files(tmp_path, sharp, "sharp/")
    assert cli.main(["generate", "--ckpt", str(weights_file), "--tokenizer",
                     str(MINIMIND3_TOKENIZER_DIR), "--prompt", "你好", "--temperature", "0",
                     "--max_new_tokens", "8", "--dtype", "float32"]) == 0
    tokenizer = load_tokenizer(MINIMIND3_TOKENIZER_DIR)
    sd = {k: v.astype(np.float16).astype(np.float32)
          for k, v in golden_state_dict(sharp, "sharp/").items()}
    new = greedy_by_recomputation(weights.params_from_state_dict(sd, CONFIGS["dense"]),
                                  CONFIGS["dense"], encode_prompt(tokenizer, "你好", True), 8,
                                  eos_id=tokenizer.eos_id)
    assert len(set(new)) > 3  # not a repeat
    answer = answer_by_hf_tokenizers(MINIMIND3_TOKENIZER_DIR, new, tokenizer.eos_id)
    assert "</think>" not in answer  # else the command prints the part after it as the answer
    assert capsys.readouterr().out == f"prompt: 你好\nanswer: {answer}\n\n"


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_hf_qwen3_export_matches_transformers(tmp_path, minimind3_golden, name):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3 (needs >= 4.51)")
    config = CONFIGS[name]
    params = weights.params_from_state_dict(
        golden_state_dict(minimind3_golden, f"{name}/init/"), config)
    out = convert.export_hf_qwen3(params, config, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == ("Qwen3MoeForCausalLM" if name == "moe"
                                    else "Qwen3ForCausalLM")
    ids = minimind3_golden["pre_input_ids"][:2, :16]
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    ours, _ = MiniMind(config).apply({"params": params}, jnp.asarray(ids))
    # about 3x the 3.6e-7 (ours) and 2.4e-7 (minimind-3's golden, MoE; dense: 0) measured
    assert_within(f"{name} transformers vs ours", max_abs_diff(theirs, ours), 1.1e-6)
    assert_within(f"{name} transformers vs minimind-3's golden",
                  max_abs_diff(theirs, minimind3_golden[f"{name}/logits"]), 7.2e-7)
