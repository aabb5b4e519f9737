"""The real reference's train step, timed beside ours: `minimind-jax bench --reference_dir PATH`.

PATH is a user's checkout of jingyaogong/minimind: MiniMind2 (d9453ed) or minimind-3 (HEAD,
d65ef2c). Its own model class is imported from there at run time (nothing of it lives in this
repository), built with our config, given our initial weights (under its state-dict names), and
stepped as that version's `train_pretrain.py` steps: its loss plus the MoE aux loss, divided by
the accumulation steps, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (its defaults); float32 on
CPU and, on CUDA, its trainer's default autocast:
- MiniMind2: its masked mean cross-entropy over the logits, `torch.cuda.amp.autocast()` (float16)
  with a GradScaler;
- minimind-3: the loss its model computes from labels (-100 where unsupervised, shifted inside
  the model), bfloat16 autocast, no GradScaler (it scales only float16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig, arch_of


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """Where one version of the reference keeps its model, and how to configure it."""

    name: str
    arch: str  # our `--arch` of the same model
    marker: str  # a file that identifies this version in a checkout
    model_module: str
    model_class: str
    config_module: str
    config_class: str
    config_kwargs: Callable[[ModelConfig], dict]
    # (model, input_ids, labels, loss_mask) -> its trainer's loss, aux loss included
    loss: Callable
    cuda_autocast: str  # its trainer's default autocast dtype on CUDA
    grad_scaler: bool  # whether its trainer scales the loss with that dtype


def _minimind2_kwargs(c: ModelConfig) -> dict:
    return dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, multiple_of=c.multiple_of,
                norm_eps=c.norm_eps, max_seq_len=c.max_seq_len, rope_theta=c.rope_theta,
                dropout=c.dropout, flash_attn=True, use_moe=c.use_moe,
                num_experts_per_tok=c.num_experts_per_tok, n_routed_experts=c.n_routed_experts,
                n_shared_experts=bool(c.n_shared_experts), aux_loss_alpha=c.aux_loss_alpha,
                seq_aux=c.seq_aux, norm_topk_prob=c.norm_topk_prob)


def _minimind2_loss(model, x, y, mask):
    """d9453ed's train_pretrain.py: masked mean CE over the logits, + aux loss."""
    import torch

    out = model(x)
    ce = torch.nn.functional.cross_entropy(out.logits.view(-1, out.logits.size(-1)), y.view(-1),
                                           reduction="none").view(y.size())
    return (ce * mask).sum() / mask.sum() + out.aux_loss


def _minimind3_loss(model, x, y, mask):
    """d65ef2c's train_pretrain.py: `model(ids, labels=labels)`, whose loss shifts the labels
    itself, + aux loss. Its rows are one token longer than our (input, target) pair, so the row
    is rebuilt: ids = x + last target, labels = ids with -100 where unsupervised."""
    import torch

    ids = torch.cat([x, y[:, -1:]], dim=1)
    labels = torch.cat([x[:, :1], torch.where(mask > 0, y, torch.full_like(y, -100))], dim=1)
    out = model(ids, labels=labels)
    return out.loss + out.aux_loss


def _minimind3_kwargs(c: ModelConfig) -> dict:
    # Its trainer sets only the first three; the rest equal its defaults for our presets and
    # are passed so that a resized config (--n_heads, ...) is built alike.
    if c.n_shared_experts or c.seq_aux:
        raise UserError("minimind-3's reference has no shared expert and a batch-level aux "
                        "loss: use the minimind3 presets' n_shared_experts=0, seq_aux=False")
    return dict(hidden_size=c.dim, num_hidden_layers=c.n_layers, use_moe=c.use_moe,
                num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                vocab_size=c.vocab_size, intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, dropout=c.dropout, num_experts=c.n_routed_experts,
                num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob,
                router_aux_loss_coef=c.aux_loss_alpha)


LAYOUTS = (
    # MiniMind2, d9453ed: model/model.py MiniMindLM(LMConfig).
    ReferenceLayout("minimind2 (d9453ed)", "minimind2", "model/model.py", "model.model",
                    "MiniMindLM", "model.LMConfig", "LMConfig", _minimind2_kwargs,
                    _minimind2_loss, cuda_autocast="float16", grad_scaler=True),
    # minimind-3, HEAD d65ef2c: model/model_minimind.py MiniMindForCausalLM(MiniMindConfig).
    ReferenceLayout("minimind-3 (d65ef2c)", "minimind3", "model/model_minimind.py",
                    "model.model_minimind", "MiniMindForCausalLM", "model.model_minimind",
                    "MiniMindConfig", _minimind3_kwargs, _minimind3_loss,
                    cuda_autocast="bfloat16", grad_scaler=False),
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

    from minimind_jax.model.weights import state_dict_from_params

    layout = find_layout(reference_dir)
    if arch_of(config) != layout.arch:
        raise UserError(f"--reference_dir {reference_dir} is {layout.name}: it needs "
                        f"--arch {layout.arch} (this model is {arch_of(config)})")
    model_cls, config_cls = import_reference(reference_dir, layout)
    model = model_cls(config_cls(**layout.config_kwargs(config)))
    # Our export names the keys as that version does (convert: MiniMind2's or minimind-3's by arch).
    state = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in state_dict_from_params(params, config).items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).train(), layout


def reference_step(model, layout: ReferenceLayout, batch: dict, device: str,
                   grad_clip: float = 1.0, accumulation_steps: int = 1):
    """A closure running one train step of `layout`'s `train_pretrain.py` on `batch`; returns
    the (undivided) loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and layout.grad_scaler)
    autocast = (torch.autocast("cuda", dtype=getattr(torch, layout.cuda_autocast)) if cuda
                else contextlib.nullcontext())
    x, y, mask = (torch.from_numpy(np.asarray(batch[k])).to(device)
                  for k in ("input_ids", "labels", "loss_mask"))
    x, y = x.long(), y.long()

    def one_step():
        with autocast:
            loss = layout.loss(model, x, y, mask)
        scaler.scale(loss / accumulation_steps).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    return one_step
