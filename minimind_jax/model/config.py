"""Model configuration: a frozen dataclass with the reference's fields, plus named presets.

Two reference families share one model: MiniMind2 (jingyaogong/minimind @ d9453ed, the defaults)
and minimind-3 (upstream HEAD d65ef2c, shared/SPEC3.md). They differ only in the switches below
(`qk_norm`, `rope_layout`, `hidden_dim_rule`, `norm_weight_fp32`, `seq_aux`, `renorm_top1`,
`init_std`, ...); `arch_defaults(arch)` gives each family's values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from minimind_jax.errors import ConfigError

ARCHES = ("minimind2", "minimind3")


def reference_hidden_dim(dim: int, multiple_of: int) -> int:
    """SwiGLU width as the reference derives it: 64 * ceil(int(2 * 4 * dim / 3) / 64)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def minimind3_hidden_dim(dim: int, multiple_of: int) -> int:
    """minimind-3's SwiGLU width: ceil(dim * pi / 64) * 64 (2432 for 768)."""
    return multiple_of * math.ceil(dim * math.pi / multiple_of)


HIDDEN_DIM_RULES = {"minimind2": reference_hidden_dim, "minimind3": minimind3_hidden_dim}


# The fields that fix the params' tree and shapes: a checkpoint only fits a config equal in these.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                "use_moe", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "scan_layers", "qk_norm", "rope_layout", "lora_rank")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a MiniMind2 model (defaults: MiniMind2-Small, 25.8M params)."""

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 6400
    hidden_dim: int | None = None  # derived from dim by `hidden_dim_rule` when None
    multiple_of: int = 64
    hidden_dim_rule: str = "minimind2"  # "minimind2": 64*ceil(8*dim/3/64); "minimind3": pi
    norm_eps: float = 1e-5
    # minimind-3 switches (MiniMind2 values by default)
    qk_norm: bool = False  # per-head RMSNorm of q and k (weights [head_dim]) before RoPE
    rope_layout: str = "interleaved"  # "interleaved": pairs (2i, 2i+1); "rotate_half": (i, i+hd/2)
    norm_weight_fp32: bool = False  # RMSNorm: weight * normed in float32, then cast (minimind-3)
    init_std: float = 0.0  # > 0: every matrix ~ N(0, init_std^2); 0: PyTorch's uniform defaults
    rope_theta: float = 1e6
    max_seq_len: int = 512
    dropout: float = 0.0
    # Mixture of experts.
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.1
    # True: MiniMind2's per-sequence balance loss; False: minimind-3's over the whole micro-batch
    seq_aux: bool = True
    renorm_top1: bool = False  # renormalise the weight of a single routed expert (-> 1.0)
    # "auto" (ragged on GPU/TPU, blocked on CPU) | "ragged" (sorted + lax.ragged_dot) |
    # "blocked" (sorted + scan over per-expert row blocks) | "dense" (every expert, every token)
    moe_impl: str = "auto"
    # Numerics and compilation.
    dtype: str = "float32"  # compute dtype of matmuls/activations
    param_dtype: str = "float32"  # master weights
    # "auto": chunked on CPU, cuDNN on GPU where it applies, else XLA | "xla" | "cudnn" |
    # "chunked" (causal attention in query blocks, skipping fully masked key ranges)
    attention_impl: str = "auto"
    # recompute activations in the backward pass; None: the training stage's default
    # (train.stages: on for dpo, distill, grpo and ppo at max_seq_len >= 256), off outside
    # training
    remat: bool | None = None
    scan_layers: bool = False
    # LoRA (the references' model_lora.py): > 0 adds an adapter of this rank to every square
    # Linear (with the default shapes: the attention's wq and wo), y = x W + (x A) B, no scaling
    lora_rank: int = 0

    def __post_init__(self):
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                 "multiple_of")
        errors = [f"{name}={getattr(self, name)} must be >= 1" for name in sizes
                  if getattr(self, name) < 1]
        if errors:  # the checks below divide by these
            raise ConfigError("invalid model config: " + "; ".join(errors))
        if self.hidden_dim_rule not in HIDDEN_DIM_RULES:
            errors.append(f"hidden_dim_rule must be one of {sorted(HIDDEN_DIM_RULES)}, "
                          f"got {self.hidden_dim_rule!r}")
        elif self.hidden_dim is None:
            rule = HIDDEN_DIM_RULES[self.hidden_dim_rule]
            object.__setattr__(self, "hidden_dim", rule(self.dim, self.multiple_of))
        if self.hidden_dim is not None and self.hidden_dim < 1:
            errors.append(f"hidden_dim={self.hidden_dim} must be >= 1")
        if self.rope_layout not in ("interleaved", "rotate_half"):
            errors.append(f"rope_layout must be interleaved|rotate_half, got {self.rope_layout!r}")
        if self.dim % self.n_heads:
            errors.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            errors.append(f"head_dim={self.dim // self.n_heads} (dim/n_heads) must be even for "
                          "rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            errors.append(f"n_heads={self.n_heads} is not divisible by "
                          f"n_kv_heads={self.n_kv_heads}")
        if self.use_moe and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            errors.append("num_experts_per_tok must be in [1, n_routed_experts]")
        if self.n_shared_experts not in (0, 1):
            errors.append("n_shared_experts must be 0 or 1 (the reference has one shared FFN)")
        if self.lora_rank < 0:
            errors.append(f"lora_rank={self.lora_rank} must be >= 0")
        if self.dropout:
            errors.append("dropout > 0 is not supported (the reference trains with 0.0)")
        if self.moe_impl not in ("auto", "ragged", "blocked", "dense"):
            errors.append(f"moe_impl must be auto|ragged|blocked|dense, got {self.moe_impl!r}")
        if self.attention_impl not in ("auto", "xla", "cudnn", "chunked"):
            errors.append("attention_impl must be auto|xla|cudnn|chunked, "
                          f"got {self.attention_impl!r}")
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tag(self) -> str:
        """Suffix the reference uses in file names: `{dim}` or `{dim}_moe`."""
        return f"{self.dim}_moe" if self.use_moe else f"{self.dim}"

    def replace(self, **changes: Any) -> ModelConfig:
        if {"dim", "multiple_of", "hidden_dim_rule"} & set(changes):
            changes.setdefault("hidden_dim", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields: {unknown}")
        return cls(**values)


# minimind-3 (shared/SPEC3.md section 1): hidden 768, 8 layers, 8 heads / 4 kv heads, eps 1e-6,
# q/k norm, rotate-half RoPE, FFN width ceil(dim*pi/64)*64, MoE top-1 of 4 without a shared
# expert and a batch-level aux loss (coef 5e-4), N(0, 0.02) init, max_seq_len 340 (pretrain's
# default).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "minimind2": {},
    "minimind3": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, norm_eps=1e-6,
                      hidden_dim_rule="minimind3", qk_norm=True, rope_layout="rotate_half",
                      norm_weight_fp32=True, init_std=0.02, max_seq_len=340,
                      num_experts_per_tok=1, n_shared_experts=0, aux_loss_alpha=5e-4,
                      seq_aux=False, renorm_top1=True),
}


def arch_defaults(arch: str) -> ModelConfig:
    """The default config of a reference family: `minimind2` or `minimind3`."""
    if arch not in _ARCH_DEFAULTS:
        raise ConfigError(f"unknown arch {arch!r}; choose from {list(ARCHES)}")
    return ModelConfig(**_ARCH_DEFAULTS[arch])


def arch_of(config: ModelConfig) -> str:
    """`minimind3` for configs with minimind-3's numerics (q/k norm), else `minimind2`."""
    return "minimind3" if config.qk_norm else "minimind2"


PRESETS: dict[str, ModelConfig] = {
    "minimind2-small": ModelConfig(dim=512, n_layers=8),
    "minimind2": ModelConfig(dim=768, n_layers=16),
    "minimind2-moe": ModelConfig(dim=640, n_layers=8, use_moe=True),
    "minimind3": arch_defaults("minimind3"),
    "minimind3-moe": arch_defaults("minimind3").replace(use_moe=True),
}


def resolve_dtype(name: str) -> str:
    """`auto` -> bfloat16 on accelerators, float32 on CPU."""
    if name != "auto":
        return name
    import jax  # only here: the config itself needs no backend

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def preset(name: str) -> ModelConfig:
    """A named preset (`minimind2-small`, `minimind2`, `minimind2-moe`, `minimind3`,
    `minimind3-moe`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
