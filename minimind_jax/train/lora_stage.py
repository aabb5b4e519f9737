"""The `lora` stage's own parts (the references' train_lora.py, docs/post_training_spec.md 1):
its base weights, the adapters it starts from, and the adapter file it writes at the end.

Everything else is the SFT path: the generation's SFT samples, schedule, accumulation and
checkpoints; `model.lora.Partition` makes the train step optimise the adapters only (AdamW
with weight decay on A and B, the clip over their gradients), the base stays frozen.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model import lora
from minimind_jax.model.config import ModelConfig, arch_of
from minimind_jax.model.run_checkpoint import latest_checkpoint
from minimind_jax.train import recipes

DEFAULT_RANK = 16  # apply_lora(model, rank=16)


def is_lora(stage) -> bool:
    return stage.command == "lora"


def model_for(model: ModelConfig) -> ModelConfig:
    """The stage's model: adapters of the reference's rank unless one was given."""
    return model if model.lora_rank else model.replace(lora_rank=DEFAULT_RANK)


def default_base(out_dir: str, model: ModelConfig) -> pathlib.Path:
    """The base the reference loads: MiniMind2 `out/rlhf_{dim}.pth` (its DPO output),
    minimind-3 `out/full_sft_{hidden}{_moe}.pth`; here our run folder of that name when it
    holds a checkpoint, else that .pth file."""
    name = recipes.stage_defaults("lora", arch_of(model))["base"]
    tag = model.replace(lora_rank=0).tag
    folder = pathlib.Path(out_dir) / f"{name}_{tag}"
    if folder.is_dir() and latest_checkpoint(folder) is not None:
        return folder
    file = pathlib.Path(out_dir) / f"{name}_{tag}.pth"
    if file.exists():
        return file
    raise UserError(f"lora starts from the {name} weights, but neither {folder} (a run folder "
                    f"with a checkpoint) nor {file} exists: pass --init_from (checkpoint "
                    "folder, .pth, .safetensors or .npz)")


def initial_params(config, source: pathlib.Path, model: ModelConfig, warn):
    """(base weights of `source` with adapters, where they came from). The base is loaded into
    the lora_rank 0 model (minimind-3's recipe: rounded to float16, as its .pth files hold
    them); the adapters come from --lora_init_from (an adapter file in the references' keys)
    or fresh from the seed (A ~ N(0, 0.02^2), B = 0)."""
    from minimind_jax.model import weights

    base, _, origin = weights.load_weights(source, model.replace(lora_rank=0), exact=True,
                                           warn=warn)
    if config.recipe.fp16_sft_init:
        base = recipes.round_to_float16(base)
        origin += " (rounded to float16, as minimind-3)"
    if config.run.lora_init_from:
        adapters = lora.load_adapters(config.run.lora_init_from, model)
        origin += f"; adapters from {config.run.lora_init_from}"
    else:
        adapters = lora.init_adapters(model, config.seed)
        origin += f"; fresh rank-{model.lora_rank} adapters (seed {config.seed})"
    return lora.with_adapters(base, adapters), origin


def adapter_file(run_dir: pathlib.Path, run_prefix: str, model: ModelConfig) -> pathlib.Path:
    """Where the reference would name it: MiniMind2 `{lora_name}_{dim}.pth` (no _moe),
    minimind-3 `{lora_name}_{hidden}{_moe}.pth`; in the run folder."""
    tag = model.tag if arch_of(model) == "minimind3" else str(model.dim)
    return run_dir / f"{run_prefix}_{tag}.pth"


def _host(x):
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def export_adapters(params, model: ModelConfig, path: pathlib.Path, is_main: bool, say):
    """The adapters of `params` as the reference's `save_lora` file (minimind-3: float16);
    `.pth` needs torch, without it an `.npz` with the same keys is written."""
    adapters = jax.tree.map(_host, lora.split(params)[0])  # every process takes part
    if not is_main:
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        path = path.with_suffix(".npz")
    lora.save_adapters(adapters, model, path, fp16=arch_of(model) == "minimind3")
    say(f"LoRA adapters: {path}")
    return path
