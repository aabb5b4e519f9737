"""Weights in and out: reference state dicts (.pth/.safetensors/.npz) <-> our param trees.

The references' keys are the interchange format: MiniMind2's (shared/SPEC.md "State-dict keys":
`tok_embeddings.weight`, `layers.{i}.attention.wq.weight`, ...; tied `output.weight`) for
MiniMind2 configs, minimind-3's HF-style ones (shared/SPEC3.md: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ...; tied `lm_head.weight`) for configs with its
q/k norm. Linear weights are [out, in]. Loading recognises either naming from the keys.
`load_weights` is the one entry for weights from a folder (our checkpoints) or a file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator

import jax
import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model import run_checkpoint
from minimind_jax.model.config import ModelConfig, arch_defaults, resolve_dtype

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class KeyNames:
    """One reference's state-dict naming (`{i}` = layer, `{e}` = expert)."""

    embedding: str
    head: str  # the tied output matrix (same tensor as `embedding`)
    norm: str
    layer: str
    attention_norm: str
    ffn_norm: str
    attention: dict  # our wq/wk/wv/wo (+ q_norm/k_norm) -> their module names
    ffn: str
    ffn_weights: dict  # our w1/w2/w3 -> their names
    router: str
    expert: str
    shared_expert: str | None


MINIMIND2_KEYS = KeyNames(
    embedding="tok_embeddings.weight", head="output.weight", norm="norm.weight",
    layer="layers.{i}", attention_norm="attention_norm", ffn_norm="ffn_norm",
    attention={"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv",
               "wo": "attention.wo"},
    ffn="feed_forward", ffn_weights={"w1": "w1", "w2": "w2", "w3": "w3"}, router="gate",
    expert="experts.{e}", shared_expert="shared_experts")
MINIMIND3_KEYS = KeyNames(
    embedding="model.embed_tokens.weight", head="lm_head.weight", norm="model.norm.weight",
    layer="model.layers.{i}", attention_norm="input_layernorm",
    ffn_norm="post_attention_layernorm",
    attention={"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
               "wo": "self_attn.o_proj", "q_norm": "self_attn.q_norm",
               "k_norm": "self_attn.k_norm"},
    ffn="mlp", ffn_weights={"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
    router="gate", expert="experts.{e}", shared_expert=None)


def key_names(config: ModelConfig) -> KeyNames:
    """minimind-3's names for configs with its q/k norm, else MiniMind2's."""
    return MINIMIND3_KEYS if config.qk_norm else MINIMIND2_KEYS


def _names_of(state_dict: dict) -> KeyNames:
    """The naming a state dict uses (minimind-3's if any key has its `model.`/`lm_head.`)."""
    hf = any(k.startswith(("model.", "lm_head.")) for k in state_dict)
    return MINIMIND3_KEYS if hf else MINIMIND2_KEYS


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One param leaf and the reference key(s) it comes from."""

    path: tuple[str, ...]
    keys: tuple[str, ...]  # several keys = expert weights stacked along a new axis 0
    transpose: bool  # Linear weight [out, in] <-> Dense kernel [in, out]


def _entries(config: ModelConfig, names: KeyNames | None = None) -> Iterator[_Entry]:
    names = names or key_names(config)
    yield _Entry(("tok_embeddings",), (names.embedding,), False)
    yield _Entry(("norm", "weight"), (names.norm,), False)
    for i in range(config.n_layers):
        layer, ref = f"layers_{i}", names.layer.format(i=i)
        for norm, theirs in (("attention_norm", names.attention_norm),
                             ("ffn_norm", names.ffn_norm)):
            yield _Entry((layer, norm, "weight"), (f"{ref}.{theirs}.weight",), False)
        for w in ("wq", "wk", "wv", "wo"):
            yield _Entry((layer, "attention", w, "kernel"),
                         (f"{ref}.{names.attention[w]}.weight",), True)
        if config.qk_norm:
            for w in ("q_norm", "k_norm"):
                yield _Entry((layer, "attention", w, "weight"),
                             (f"{ref}.{names.attention[w]}.weight",), False)
        ffn = f"{ref}.{names.ffn}"
        if not config.use_moe:
            for w, theirs in names.ffn_weights.items():
                yield _Entry((layer, "feed_forward", w, "kernel"), (f"{ffn}.{theirs}.weight",),
                             True)
            continue
        yield _Entry((layer, "feed_forward", "gate"), (f"{ffn}.{names.router}.weight",), True)
        for w, theirs in names.ffn_weights.items():
            experts = tuple(f"{ffn}.{names.expert.format(e=e)}.{theirs}.weight"
                            for e in range(config.n_routed_experts))
            yield _Entry((layer, "feed_forward", w), experts, True)
            if config.n_shared_experts:
                yield _Entry((layer, "feed_forward", "shared_experts", w, "kernel"),
                             (f"{ffn}.{names.shared_expert}.{theirs}.weight",), True)


def _expected_shape(entry: _Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = leaf_shape[1:] if len(entry.keys) > 1 else leaf_shape
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from minimind_jax.model.transformer import MiniMind

    unscanned = config.replace(scan_layers=False, remat=False)
    shapes = jax.eval_shape(lambda: MiniMind(unscanned).init(
        jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def stack_layers(params: dict, n_layers: int) -> dict:
    """`layers_0..layers_{L-1}` -> `layers/block` with a leading [L] axis (scan_layers layout)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    out["layers"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return out


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"]["block"])
    return out


def _normalise_keys(state_dict: dict) -> dict:
    clean = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    return clean


def params_from_state_dict(state_dict: dict, config: ModelConfig, source: str = "state dict"):
    """Reference-keyed state dict -> our param pytree (param_dtype, layout of `config`).

    Either tied key may be given (both must agree if both are). Raises UserError listing every
    missing, unexpected and mis-shaped key.
    """
    sd = _normalise_keys(state_dict)
    names = key_names(config)
    if names.embedding not in sd and names.head in sd:
        sd[names.embedding] = sd[names.head]
    embedding = sd.get(names.embedding)
    tied_mismatch = (names.head in sd and sd[names.head] is not embedding
                     and not np.array_equal(np.asarray(sd[names.head]), embedding))
    shapes = _param_shapes(config)
    entries = list(_entries(config))
    expected = {key for e in entries for key in e.keys} | {names.head}
    missing = sorted({key for e in entries for key in e.keys} - set(sd))
    unexpected = sorted(set(sd) - expected)
    misshaped = []
    for e in entries:
        want = _expected_shape(e, shapes[e.path])
        misshaped += [f"{k}: got {tuple(np.shape(sd[k]))}, expected {want}"
                      for k in e.keys if k in sd and tuple(np.shape(sd[k])) != want]
    if missing or unexpected or misshaped or tied_mismatch:
        lines = [f"{source} does not fit the model config (dim={config.dim}, "
                 f"n_layers={config.n_layers}, n_heads={config.n_heads}, "
                 f"n_kv_heads={config.n_kv_heads}, vocab_size={config.vocab_size}, "
                 f"use_moe={config.use_moe}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                more = [f"... and {len(items) - 20} more"] if len(items) > 20 else []
                shown = items[:20] + more
                lines.append(f"  {title} keys ({len(items)}): " + ", ".join(shown))
        if tied_mismatch:
            lines.append(f"  {names.head} differs from {names.embedding} (they must be tied)")
        raise UserError("\n".join(lines))

    params: dict = {}
    dtype = np.dtype(config.param_dtype) if config.param_dtype != "bfloat16" else jax.numpy.bfloat16
    for e in entries:
        arrays = [np.asarray(sd[k], dtype=np.float32) for k in e.keys]
        arrays = [a.T if e.transpose else a for a in arrays]
        value = np.stack(arrays) if len(e.keys) > 1 else arrays[0]
        _set(params, e.path, np.ascontiguousarray(value).astype(dtype))
    if config.scan_layers:
        params = stack_layers(params, config.n_layers)
    return jax.tree.map(jax.numpy.asarray, params)


def state_dict_from_params(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> reference-keyed float32 numpy state dict (both tied keys written), in
    the naming of the config's family (`key_names`)."""
    params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), jax.device_get(params))
    if config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    sd = {}
    for e in _entries(config):
        value = _get(params, e.path)
        parts = list(value) if len(e.keys) > 1 else [value]
        for key, part in zip(e.keys, parts, strict=True):
            sd[key] = np.ascontiguousarray(part.T if e.transpose else part)
    names = key_names(config)
    sd[names.head] = sd[names.embedding]
    return sd


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a reference-keyed state dict from .pth (needs torch), .safetensors or .npz."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weights file (.pth, .safetensors or .npz)")
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise UserError(f"reading {path} needs PyTorch: pip install 'minimind_jax[torch]'"
                            ) from None
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty (0 bytes), not a PyTorch state dict")
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 184" on junk
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt/unsafe files
            raise UserError(f"could not read {path} as a PyTorch state dict: "
                            f"{_torch_load_reason(err)}") from None
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        if not isinstance(obj, dict):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise UserError(f"{path}: entries that are not tensors: {bad[:10]}")
        return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:
            raise UserError(f"could not read {path} as safetensors: {err}") from None
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):  # else numpy suggests allow_pickle, which is no fix
            raise UserError(f"{path} is not a .npz file (not a zip archive)"
                            + (" but empty (0 bytes)" if path.stat().st_size == 0 else ""))
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as err:
            raise UserError(f"could not read {path} as .npz: {err}") from None
    raise UserError(f"unknown weights format {path.suffix!r} for {path}: "
                    "expected .pth, .safetensors or .npz")


def _torch_load_reason(err: Exception) -> str:
    """torch.load's error without its advice to load with weights_only=False (that runs
    arbitrary code, and does not make a file that is no state dict into one). On a file
    that is no pickle at all torch's unpickler raises whatever it trips on (KeyError: 96,
    IndexError, UnicodeDecodeError), so the reason always says what was expected."""
    text = " ".join(str(err).split())
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if detail:
        text = detail.group(1).strip()
    elif "weights_only" in text:
        text = ""
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return f"not a plain dict of tensors as torch.save writes it ({detail[:160]})"


def save_state_dict(state_dict: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    """Write a state dict as .pth (torch), .safetensors or .npz, chosen by the extension."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        import torch

        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
        names = _names_of(tensors)
        if names.embedding in tensors:  # tied: one tensor under both keys, as the reference
            tensors[names.head] = tensors[names.embedding]
        torch.save(tensors, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    elif suffix == ".npz":
        np.savez(path, **state_dict)
    else:
        raise UserError(f"unknown output format {path.suffix!r}: use .pth, .safetensors or .npz")


# Fields that make a config minimind-3 apart from its shape (config._ARCH_DEFAULTS).
_MINIMIND3_SWITCHES = ("norm_eps", "hidden_dim_rule", "qk_norm", "rope_layout",
                       "norm_weight_fp32", "init_std", "num_experts_per_tok", "n_shared_experts",
                       "aux_loss_alpha", "seq_aux", "renorm_top1")


def infer_config(state_dict: dict, base: ModelConfig) -> ModelConfig:
    """Fill the fields a state dict determines (dim, layers, vocab, kv heads, hidden, MoE).

    minimind-3's naming also selects its numerics (on top of `base`, if `base` is not already
    minimind-3) and gives n_heads (dim / the q_norm width); with MiniMind2's naming n_heads
    cannot be read from the weights and comes from `base`.
    """
    sd = _normalise_keys(state_dict)
    names = _names_of(sd)
    if names is MINIMIND3_KEYS and not base.qk_norm:
        minimind3 = arch_defaults("minimind3")
        base = base.replace(**{f: getattr(minimind3, f) for f in _MINIMIND3_SWITCHES})
    emb = sd.get(names.embedding, sd.get(names.head))
    if emb is None:
        raise UserError(f"state dict has neither {names.embedding} nor {names.head}")
    vocab_size, dim = np.shape(emb)
    layer_prefix = names.layer.split("{")[0]
    layer_ids = {int(k[len(layer_prefix):].split(".")[0]) for k in sd
                 if k.startswith(layer_prefix)}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    first = names.layer.format(i=0)
    use_moe = f"{first}.{names.ffn}.{names.router}.weight" in sd
    changes = dict(dim=int(dim), vocab_size=int(vocab_size), n_layers=n_layers, use_moe=use_moe)
    q_norm = sd.get(f"{first}.{names.attention.get('q_norm', '-')}.weight")
    head_dim = int(np.shape(q_norm)[0]) if q_norm is not None else dim // base.n_heads
    if q_norm is not None:
        changes["n_heads"] = int(dim // head_dim)
    wk = sd.get(f"{first}.{names.attention['wk']}.weight")
    if wk is not None:
        changes["n_kv_heads"] = int(np.shape(wk)[0] // head_dim)
    expert = f"{names.expert.format(e=0)}." if use_moe else ""
    w1 = sd.get(f"{first}.{names.ffn}.{expert}{names.ffn_weights['w1']}.weight")
    if w1 is not None:
        changes["hidden_dim"] = int(np.shape(w1)[0])
    if use_moe:
        expert_prefix = f"{first}.{names.ffn}.{names.expert.split('{')[0]}"
        changes["n_routed_experts"] = len({k[len(expert_prefix):].split(".")[0] for k in sd
                                           if k.startswith(expert_prefix)})
        changes["n_shared_experts"] = int(names.shared_expert is not None and any(
            f".{names.shared_expert}." in k for k in sd))
    return dataclasses.replace(base, **changes)


def load_weights(path: str | pathlib.Path, config: ModelConfig | None = None, *,
                 exact: bool = False, dtype: str | None = None,
                 warn: Callable[[str], None] | None = None) -> tuple[dict, ModelConfig, str]:
    """(params, their ModelConfig, where they came from) from an orbax run folder (its
    newest intact checkpoint, damaged ones skipped with `warn`), a checkpoint folder, or a
    state-dict file: the one way to load weights (training's start, generate, chat, eval, serve,
    convert).

    `exact`: the weights must fit `config` exactly (reference keys and shapes; otherwise a
    UserError lists the missing, unexpected and mis-shaped keys) and come back as numpy arrays:
    what training starts from, never a random fallback. Otherwise the shape fields come from the
    weights: a folder's saved config, or a file's shapes inferred on top of `config` (default
    ModelConfig()). `dtype` sets the returned config's compute dtype (`auto`: by platform).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"weights not found: {path}")
    config = config or ModelConfig()
    if path.is_dir():
        params, saved_config, origin = run_checkpoint.restore_params(path, warn)
        if exact:
            state_dict = state_dict_from_params(params, saved_config)
        else:
            config = saved_config
    else:
        origin = str(path)
        state_dict = load_state_dict(path)
        if not exact:
            config = infer_config(state_dict, config)
            params = params_from_state_dict(state_dict, config, source=origin)
    if exact:
        params = params_from_state_dict(state_dict, config, source=str(path))
        params = jax.tree.map(np.asarray, params)
    if dtype is not None:
        config = config.replace(dtype=resolve_dtype(dtype))
    return params, config, origin
