"""`bench --reference_dir`: the reference's own model class from a checkout, timed beside ours.

The plumbing is checked against a fake checkout (a minimal module with the reference's
interface); the real reference is used when a d9453ed checkout is named by
MINIMIND_REFERENCE_DIR (or lies at /tmp/minimind_d9453ed) and a HEAD (d65ef2c) checkout by
MINIMIND_REFERENCE_HEAD_DIR (or lies at /tmp/minimind_head), else those tests skip.
"""

import os
import pathlib
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind, init_params
from minimind_jax.tools import bench, reference_bench
from tests.helpers import TINY_CONFIG

torch = pytest.importorskip("torch")

TINY = TINY_CONFIG.replace(n_heads=8)
REAL_DIR = pathlib.Path(os.environ.get("MINIMIND_REFERENCE_DIR", "/tmp/minimind_d9453ed"))
MINIMIND3_DIR = pathlib.Path(os.environ.get("MINIMIND_REFERENCE_HEAD_DIR", "/tmp/minimind_head"))
TINY_MINIMIND3 = arch_defaults("minimind3").replace(dim=64, n_layers=2, max_seq_len=64)

FAKE_CONFIG = '''
class LMConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
'''

# The reference's interface: MiniMindLM(LMConfig) -> out.logits, out.aux_loss; it records the
# config and the state dict keys it was given, so the test sees what the bench passed in.
FAKE_MODEL = '''
import types
import torch
from .LMConfig import LMConfig

SEEN = {}


class MiniMindLM(torch.nn.Module):
    def __init__(self, params: LMConfig):
        super().__init__()
        SEEN["config"] = dict(vars(params))
        self.tok_embeddings = torch.nn.Embedding(params.vocab_size, params.dim)

    def load_state_dict(self, state_dict, strict=True):
        SEEN["keys"] = sorted(state_dict)
        return super().load_state_dict(
            {"tok_embeddings.weight": state_dict["tok_embeddings.weight"]}, strict=strict)

    def forward(self, input_ids):
        h = self.tok_embeddings(input_ids)
        return types.SimpleNamespace(logits=h @ self.tok_embeddings.weight.T, aux_loss=0)
'''


@pytest.fixture
def fake_checkout(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "LMConfig.py").write_text(textwrap.dedent(FAKE_CONFIG))
    (tmp_path / "model" / "model.py").write_text(textwrap.dedent(FAKE_MODEL))
    return tmp_path


@pytest.mark.slow
def test_bench_times_the_checkouts_model_beside_ours(fake_checkout, capsys):
    results = bench.run_bench(TINY, 2, 32, steps=1, warmup=0, with_torch=False,
                              reference_dir=fake_checkout)
    import model.model as fake  # what the bench imported from the fake checkout

    assert pathlib.Path(fake.__file__).parent.parent == fake_checkout
    assert fake.SEEN["config"]["dim"] == 64 and fake.SEEN["config"]["n_kv_heads"] == 2
    assert "layers.1.feed_forward.w3.weight" in fake.SEEN["keys"]
    assert results["reference"]["tokens_per_s"] > 0 and results["speedup_vs_reference"] > 0
    out = capsys.readouterr().out
    assert "reference: minimind2 (d9453ed) MiniMindLM" in out
    assert "jax / reference tokens/s" in out


def test_not_a_checkout_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a jingyaogong/minimind checkout"):
        reference_bench.find_layout(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        reference_bench.find_layout(tmp_path / "missing")


def _first_step_losses(checkout, config):
    """(the reference's first-step loss, ours) on one batch, from the same initial weights."""
    params = init_params(config, 0)
    batch = bench.synthetic_batch(2, 32, config.vocab_size)
    batch["loss_mask"][:, :5] = 0  # some unsupervised targets (-100 labels for minimind-3's model)
    model, layout = reference_bench.build_reference(checkout, config, params, "cpu")
    reference_loss = reference_bench.reference_step(model, layout, batch, "cpu")()
    logits, aux = MiniMind(config).apply({"params": params}, jnp.asarray(batch["input_ids"]))
    ours = masked_cross_entropy(logits, batch["labels"], batch["loss_mask"]) + aux
    return reference_loss, float(ours)


NO_MINIMIND2 = pytest.mark.skipif(not (REAL_DIR / "model" / "model.py").is_file(),
                                  reason="no d9453ed checkout (set MINIMIND_REFERENCE_DIR)")
NO_MINIMIND3 = pytest.mark.skipif(not (MINIMIND3_DIR / "model" / "model_minimind.py").is_file(),
                             reason="no HEAD (d65ef2c) checkout (set MINIMIND_REFERENCE_HEAD_DIR)")


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("checkout, config", [
    pytest.param(REAL_DIR, TINY, marks=NO_MINIMIND2, id="minimind2"),
    # minimind-3's MiniMindForCausalLM takes our minimind3 weights under its names and the batch as
    # labels with -100; its loss is its own CE + its batch-level aux loss.
    pytest.param(MINIMIND3_DIR, TINY_MINIMIND3, marks=NO_MINIMIND3, id="minimind3"),
])
def test_real_reference_gets_our_weights(checkout, config, use_moe):
    # The reference model built by the bench gives our first-step loss on the same batch.
    reference_loss, ours = _first_step_losses(checkout, config.replace(use_moe=use_moe))
    np.testing.assert_allclose(reference_loss, ours, atol=1e-5)


@NO_MINIMIND3
def test_minimind3_checkout_needs_the_minimind3_arch():
    with pytest.raises(UserError, match="needs --arch minimind3"):
        reference_bench.build_reference(MINIMIND3_DIR, TINY, init_params(TINY, 0), "cpu")


@pytest.mark.parametrize("checkout, config", [
    pytest.param(REAL_DIR, TINY, marks=NO_MINIMIND2, id="minimind2"),
    pytest.param(MINIMIND3_DIR, TINY_MINIMIND3, marks=NO_MINIMIND3, id="minimind3"),
])
def test_real_reference_load_lora_reads_our_adapter_file(tmp_path, checkout, config):
    """The reference's own apply_lora + load_lora on our adapter .pth, over our base weights,
    gives our adapted model's logits."""
    import importlib
    import sys

    import jax

    from minimind_jax.model import lora

    adapted = config.replace(lora_rank=16)
    base = init_params(config, 0)
    adapters = jax.tree.map(lambda x: 0.05 * np.asarray(jax.random.normal(
        jax.random.PRNGKey(1), x.shape)), lora.split(init_params(adapted, 2))[0])
    params = lora.join(adapters, base)
    path = tmp_path / "adapter.pth"
    fp16 = checkout == MINIMIND3_DIR  # minimind-3 saves its adapters in float16
    lora.save_adapters(params, adapted, path, fp16=fp16)
    model, _ = reference_bench.build_reference(checkout, config, base, "cpu")
    sys.path.insert(0, str(checkout.resolve()))
    try:
        model_lora = importlib.import_module("model.model_lora")
    finally:
        sys.path.remove(str(checkout.resolve()))
    model_lora.apply_lora(model, rank=16)
    model_lora.load_lora(model, str(path))
    ids = np.random.RandomState(0).randint(3, config.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.float().numpy()
    if fp16:  # ours from the adapters as the file holds them
        params = lora.attach_adapter_file(base, config, path)[0]
    ours = np.asarray(MiniMind(adapted).apply({"params": params}, jnp.asarray(ids))[0])
    diff = float(np.abs(theirs - ours).max())
    print(f"{checkout.name}: max |reference load_lora logits - ours| = {diff:.3g}")
    assert diff < 1e-4, diff
