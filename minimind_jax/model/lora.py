"""LoRA adapters (the references' `model/model_lora.py`): which leaves they are, their
reference key names, adapter files, and merging them into the base weights.

In our param tree an adapted projection (a `LoRADense`, see `transformer`) holds `kernel`
[in, out] and `lora_A` [in, rank], `lora_B` [rank, out]: the references' `A.weight` [rank, in]
and `B.weight` [out, rank] transposed. Their adapter files (`save_lora`) map
`{linear name}.lora.A.weight` / `.lora.B.weight` to those weights: MiniMind2 float32,
minimind-3 float16. Effective scale 1 (no alpha), so `merged kernel = kernel + A B`.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig

LORA_LEAVES = ("lora_A", "lora_B")
_THEIRS = {"lora_A": "A.weight", "lora_B": "B.weight"}


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base): two nested dicts with the same nesting, each holding only its leaves."""
    adapters, base = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b:
                base[key] = b
        elif key in LORA_LEAVES:
            adapters[key] = value
        else:
            base[key] = value
    return adapters, base


def join(adapters: dict, base: dict) -> dict:
    """The inverse of `split`: one tree with the leaves of both."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join(value, base.get(key, {})) if isinstance(value, dict) else value
    return out


class Partition:
    """What the train step optimises: the adapters; the base weights stay frozen."""

    split = staticmethod(split)
    join = staticmethod(join)


def init_adapters(config: ModelConfig, rng) -> dict:
    """Fresh adapters of `config` (A ~ N(0, 0.02^2), B = 0), as numpy arrays."""
    from minimind_jax.model.transformer import init_params

    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    return jax.tree.map(np.asarray, split(init_params(config, key))[0])


def with_adapters(base: dict, adapters: dict) -> dict:
    """Base weights (a lora_rank 0 tree) with `adapters` added."""
    return join(adapters, base)


def _adapted(config: ModelConfig):
    """(our path of the adapted module, the reference's Linear name), for the square
    projections of an unscanned tree, in layer order."""
    from minimind_jax.model.weights import key_names

    names = key_names(config)
    hd = config.head_dim
    for i in range(config.n_layers):
        layer, ref = f"layers_{i}", names.layer.format(i=i)
        if config.n_heads * hd == config.dim:
            yield (layer, "attention", "wq"), f"{ref}.{names.attention['wq']}"
        if config.n_kv_heads * hd == config.dim:
            for w in ("wk", "wv"):
                yield (layer, "attention", w), f"{ref}.{names.attention[w]}"
        if config.n_heads * hd == config.dim:
            yield (layer, "attention", "wo"), f"{ref}.{names.attention['wo']}"
        if config.hidden_dim == config.dim:
            ffn = f"{ref}.{names.ffn}"
            if not config.use_moe:
                for w, theirs in names.ffn_weights.items():
                    yield (layer, "feed_forward", w), f"{ffn}.{theirs}"
            elif config.n_shared_experts:
                for w, theirs in names.ffn_weights.items():
                    yield ((layer, "feed_forward", "shared_experts", w),
                           f"{ffn}.{names.shared_expert}.{theirs}")


def _unscanned(params: dict, config: ModelConfig) -> dict:
    from minimind_jax.model.weights import unstack_layers

    return unstack_layers(params, config.n_layers) if config.scan_layers else params


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def adapter_state_dict(params: dict, config: ModelConfig, dtype=np.float32) -> dict:
    """The references' `save_lora` dict of `params`' adapters: `{linear}.lora.A.weight`
    [rank, in], `{linear}.lora.B.weight` [out, rank], as `dtype` (minimind-3: float16)."""
    params = _unscanned(params, config)
    out = {}
    for path, theirs in _adapted(config):
        module = _get(params, path)
        for ours, suffix in _THEIRS.items():
            out[f"{theirs}.lora.{suffix}"] = np.asarray(module[ours], np.float32).T.astype(dtype)
    return out


def adapters_from_state_dict(state_dict: dict, config: ModelConfig, source: str) -> dict:
    """Our adapter tree (unscanned; float32) from a `save_lora` dict. Like the references'
    `load_lora`, a key matches a module when it contains `{linear}.lora.` (a `module.` prefix
    is thus ignored); every adapted module must be found, with the right shapes."""
    tree: dict = {}
    missing, bad = [], []
    rank = config.lora_rank
    for path, theirs in _adapted(config):
        module = tree
        for key in path:
            module = module.setdefault(key, {})
        for ours, suffix in _THEIRS.items():
            wanted = f"{theirs}.lora.{suffix}"
            hits = [k for k in state_dict if k.endswith(wanted)
                    and (k == wanted or k[:-len(wanted)].endswith("."))]
            if not hits:
                missing.append(wanted)
                continue
            value = np.asarray(state_dict[hits[0]], np.float32).T
            expected = (config.dim, rank) if ours == "lora_A" else (rank, config.dim)
            if value.shape != expected:
                bad.append(f"{wanted}: {tuple(reversed(value.shape))}, expected "
                           f"{tuple(reversed(expected))}")
            module[ours] = value
    if missing or bad:
        raise UserError(f"{source} does not hold this model's LoRA adapters (rank {rank}):"
                        + (f"\n  missing: {', '.join(missing[:6])}" if missing else "")
                        + (f"\n  mis-shaped: {'; '.join(bad[:6])}" if bad else ""))
    if config.scan_layers:
        from minimind_jax.model.weights import stack_layers

        tree = stack_layers(tree, config.n_layers)
    return tree


def load_adapters(path: str | pathlib.Path, config: ModelConfig) -> dict:
    """Our adapter tree from an adapter file (.pth needs torch, .safetensors, .npz)."""
    from minimind_jax.model.weights import load_state_dict

    return adapters_from_state_dict(load_state_dict(path), config, str(path))


def save_adapters(params: dict, config: ModelConfig, path: str | pathlib.Path,
                  fp16: bool) -> pathlib.Path:
    """`params`' adapters as the references' adapter file (fp16: minimind-3's `.half()`)."""
    from minimind_jax.model.weights import save_state_dict

    path = pathlib.Path(path)
    save_state_dict(adapter_state_dict(params, config, np.float16 if fp16 else np.float32),
                    path)
    return path


def merged(params: dict, config: ModelConfig, fp16: bool = False) -> dict:
    """The base weights with each adapter folded in: kernel + A B, without LoRA leaves (a
    lora_rank 0 tree). `fp16`: minimind-3's `merge_lora`, fp16(W) + fp16(B A) rounded to
    float16 (the result kept as float32 values)."""
    def fold(module: dict) -> dict:
        out = {k: fold(v) if isinstance(v, dict) else v for k, v in module.items()
               if k not in LORA_LEAVES}
        if "lora_A" in module:
            a = np.asarray(module["lora_A"], np.float32)
            b = np.asarray(module["lora_B"], np.float32)
            delta = np.matmul(a, b)  # [.., in, out]: (B A)^T
            kernel = np.asarray(module["kernel"], np.float32)
            if fp16:
                total = kernel.astype(np.float16) + delta.astype(np.float16)
                out["kernel"] = total.astype(np.float16).astype(np.float32)
            else:
                out["kernel"] = kernel + delta
        return out

    del config  # the tree says which modules are adapted
    return fold(jax.tree.map(np.asarray, params))


def attach_adapter_file(params: dict, config: ModelConfig, adapter_path):
    """(params, config) with the adapters of `adapter_path` (the references' `save_lora` keys;
    its rank read from the file) in place of any the params had: the reference's `load_lora`
    on a model after `apply_lora`. For `--lora_weight` of the inference commands."""
    from minimind_jax.model.weights import load_state_dict

    state_dict = load_state_dict(adapter_path)
    ranks = {np.shape(v)[0] for k, v in state_dict.items() if k.endswith(".lora.A.weight")}
    if len(ranks) != 1:
        raise UserError(f"{adapter_path}: no LoRA adapters of one rank (keys "
                        "'<linear>.lora.A.weight' / '.lora.B.weight'), found ranks "
                        f"{sorted(ranks)}")
    config = config.replace(lora_rank=ranks.pop())
    adapters = adapters_from_state_dict(state_dict, config, str(adapter_path))
    return join(adapters, split(params)[1]), config


def merge_for_export(params: dict, config: ModelConfig, adapter_path=None):
    """(params, config) without LoRA leaves, for `convert`: the adapters of `params` (a LoRA
    run's checkpoint) or of the adapter file `adapter_path` (`attach_adapter_file`) folded
    into the kernels. minimind-3 adds in float16 as its `merge_lora`; MiniMind2 (no merge
    function of its own) in float32."""
    from minimind_jax.model.generation import generation_of

    if adapter_path is not None:
        params, config = attach_adapter_file(params, config, adapter_path)
    if not config.lora_rank:
        return params, config
    fp16 = generation_of(config).float16_files  # minimind-3 merges as it stores: in float16
    return merged(params, config, fp16=fp16), config.replace(lora_rank=0)
