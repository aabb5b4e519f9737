"""Model configuration: a frozen dataclass with the reference's fields, plus named presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def reference_hidden_dim(dim: int, multiple_of: int) -> int:
    """SwiGLU width as the reference derives it: 64 * ceil(int(2 * 4 * dim / 3) / 64)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a MiniMind2 model (defaults: MiniMind2-Small, 25.8M params)."""

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 6400
    hidden_dim: int | None = None  # derived from dim when None
    multiple_of: int = 64
    norm_eps: float = 1e-5
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
    seq_aux: bool = True
    # "auto" (ragged on GPU/TPU, blocked on CPU) | "ragged" (sorted + lax.ragged_dot) |
    # "blocked" (sorted + scan over per-expert row blocks) | "dense" (every expert, every token)
    moe_impl: str = "auto"
    # Numerics and compilation.
    dtype: str = "float32"  # compute dtype of matmuls/activations
    param_dtype: str = "float32"  # master weights
    # "auto": chunked on CPU, cuDNN on GPU where it applies, else XLA | "xla" | "cudnn" |
    # "chunked" (causal attention in query blocks, skipping fully masked key ranges)
    attention_impl: str = "auto"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                 "multiple_of")
        errors = [f"{name}={getattr(self, name)} must be >= 1" for name in sizes
                  if getattr(self, name) < 1]
        if errors:  # the checks below divide by these
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))
        if self.hidden_dim is None:
            object.__setattr__(self, "hidden_dim", reference_hidden_dim(self.dim, self.multiple_of))
        if self.hidden_dim < 1:
            errors.append(f"hidden_dim={self.hidden_dim} must be >= 1")
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
        if self.dropout:
            errors.append("dropout > 0 is not supported (the reference trains with 0.0)")
        if self.moe_impl not in ("auto", "ragged", "blocked", "dense"):
            errors.append(f"moe_impl must be auto|ragged|blocked|dense, got {self.moe_impl!r}")
        if self.attention_impl not in ("auto", "xla", "cudnn", "chunked"):
            errors.append("attention_impl must be auto|xla|cudnn|chunked, "
                          f"got {self.attention_impl!r}")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tag(self) -> str:
        """Suffix the reference uses in file names: `{dim}` or `{dim}_moe`."""
        return f"{self.dim}_moe" if self.use_moe else f"{self.dim}"

    def replace(self, **changes: Any) -> ModelConfig:
        if "dim" in changes or "multiple_of" in changes:
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
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    "minimind2-small": ModelConfig(dim=512, n_layers=8),
    "minimind2": ModelConfig(dim=768, n_layers=16),
    "minimind2-moe": ModelConfig(dim=640, n_layers=8, use_moe=True),
}


def preset(name: str) -> ModelConfig:
    """A named preset (`minimind2-small`, `minimind2`, `minimind2-moe`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
