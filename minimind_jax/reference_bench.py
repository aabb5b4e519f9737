"""The real reference's train step, timed beside ours: `minimind-jax bench --reference_dir PATH`.

PATH is a user's checkout of jingyaogong/minimind. Its own model class is imported from there at
run time (nothing of it lives in this repository), built with our config, given our initial
weights, and stepped as its `train_pretrain.py` steps: masked mean cross-entropy plus the MoE
aux loss, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (its defaults), under
`torch.cuda.amp.autocast()` (float16) with a GradScaler on CUDA and in float32 on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """Where one version of the reference keeps its model, and how to configure it."""

    name: str
    marker: str  # a file that identifies this version in a checkout
    model_module: str
    model_class: str
    config_module: str
    config_class: str
    config_kwargs: Callable[[ModelConfig], dict]
    # Our params -> a state dict its model loads; None: not mapped yet.
    state_dict: Callable[[dict, ModelConfig], dict] | None


def _minimind2_kwargs(c: ModelConfig) -> dict:
    return dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, multiple_of=c.multiple_of,
                norm_eps=c.norm_eps, max_seq_len=c.max_seq_len, rope_theta=c.rope_theta,
                dropout=c.dropout, flash_attn=True, use_moe=c.use_moe,
                num_experts_per_tok=c.num_experts_per_tok, n_routed_experts=c.n_routed_experts,
                n_shared_experts=bool(c.n_shared_experts), aux_loss_alpha=c.aux_loss_alpha,
                seq_aux=c.seq_aux, norm_topk_prob=c.norm_topk_prob)


def _minimind2_state_dict(params, config: ModelConfig) -> dict:
    from minimind_jax.convert import state_dict_from_params

    return state_dict_from_params(params, config)  # the reference's keys are our interchange


def _minimind3_kwargs(c: ModelConfig) -> dict:
    return dict(hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, use_moe=c.use_moe, num_experts=c.n_routed_experts,
                num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)


LAYOUTS = (
    # MiniMind2, d9453ed: model/model.py MiniMindLM(LMConfig).
    ReferenceLayout("minimind2 (d9453ed)", "model/model.py", "model.model", "MiniMindLM",
                    "model.LMConfig", "LMConfig", _minimind2_kwargs, _minimind2_state_dict),
    # minimind-3, HEAD d65ef2c: model/model_minimind.py MiniMindForCausalLM(MiniMindConfig).
    # Its weights need the minimind-3 architecture on our side (--arch minimind3) first.
    ReferenceLayout("minimind-3 (d65ef2c)", "model/model_minimind.py", "model.model_minimind",
                    "MiniMindForCausalLM", "model.model_minimind", "MiniMindConfig",
                    _minimind3_kwargs, None),
)


def find_layout(reference_dir: pathlib.Path) -> ReferenceLayout:
    """The layout of the checkout at `reference_dir`, or UserError."""
    if not reference_dir.is_dir():
        raise UserError(f"--reference_dir {reference_dir}: not a folder")
    for layout in LAYOUTS:
        if (reference_dir / layout.marker).is_file():
            return layout
    markers = " or ".join(layout.marker for layout in LAYOUTS)
    raise UserError(f"--reference_dir {reference_dir}: not a jingyaogong/minimind checkout "
                    f"(no {markers})")


def import_reference(reference_dir: pathlib.Path, layout: ReferenceLayout):
    """(model class, config class) imported from the checkout. Its top-level `model` package
    is looked up in `reference_dir` alone, so another `model` on sys.path cannot shadow it."""
    path = str(reference_dir.resolve())
    stale = [name for name in sys.modules if name == "model" or name.startswith("model.")]
    for name in stale:  # e.g. a second checkout imported earlier in this process
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        model_cls = getattr(importlib.import_module(layout.model_module), layout.model_class)
        config_cls = getattr(importlib.import_module(layout.config_module), layout.config_class)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--reference_dir {reference_dir}: cannot import "
                        f"{layout.model_module}.{layout.model_class} ({err})") from None
    finally:
        sys.path.remove(path)
    return model_cls, config_cls


def build_reference(reference_dir: pathlib.Path, config: ModelConfig, params, device: str):
    """The reference's model at `reference_dir` with our `config` and our `params` loaded."""
    import torch

    layout = find_layout(reference_dir)
    if layout.state_dict is None:
        raise UserError(f"--reference_dir {reference_dir} is {layout.name}: its weights do not "
                        f"map to this model yet (use a d9453ed checkout)")
    model_cls, config_cls = import_reference(reference_dir, layout)
    model = model_cls(config_cls(**layout.config_kwargs(config)))
    state = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in layout.state_dict(params, config).items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).train(), layout


def reference_step(model, batch: dict, device: str, grad_clip: float = 1.0):
    """A closure running one train step of `train_pretrain.py` on `batch`; returns the loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    autocast = (torch.autocast("cuda", dtype=torch.float16) if cuda
                else contextlib.nullcontext())
    x, y, mask = (torch.from_numpy(np.asarray(batch[k])).to(device)
                  for k in ("input_ids", "labels", "loss_mask"))
    x, y = x.long(), y.long()
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")

    def one_step():
        with autocast:
            out = model(x)
            loss = loss_fct(out.logits.view(-1, out.logits.size(-1)), y.view(-1)).view(y.size())
            loss = (loss * mask).sum() / mask.sum()
            loss = loss + out.aux_loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    return one_step
