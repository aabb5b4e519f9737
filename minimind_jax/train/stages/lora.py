"""LoRA fine-tuning (`minimind-jax lora`): the references' train_lora.py
(docs/post_training_spec.md 1). Its own parts: its base weights, the adapters it starts from,
which parameters train, and the adapter file it writes at the end.

Everything else is the SFT path: the generation's SFT samples, schedule, accumulation and
checkpoints; `model.lora.Partition` makes the train step optimise the adapters only (AdamW
with weight decay on A and B, the clip over their gradients), the base stays frozen.
"""

from __future__ import annotations

import pathlib

import jax

from minimind_jax.model import lora
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.generation import generation_of
from minimind_jax.runtime import distributed
from minimind_jax.train.run_log import say
from minimind_jax.train.stages.stage import Stage, on_host, start_params, with_torch_or_npz

DEFAULT_RANK = 16  # apply_lora(model, rank=16)


def model_for(model: ModelConfig) -> ModelConfig:
    """The stage's model: adapters of the reference's rank unless one was given."""
    return model if model.lora_rank else model.replace(lora_rank=DEFAULT_RANK)


def partition(model: ModelConfig) -> lora.Partition:
    """Only the adapters train; the base stays frozen."""
    del model
    return lora.Partition()


def initial_params(config, stage, source: pathlib.Path | None, model: ModelConfig, warn):
    """(base weights of `source` with adapters, where they came from). The base is loaded into
    the lora_rank 0 model (minimind-3's recipe: rounded to float16, as its .pth files hold
    them); the adapters come from --lora_init_from (an adapter file in the references' keys)
    or fresh from the seed (A ~ N(0, 0.02^2), B = 0)."""
    base, origin = start_params(config, stage, source, model.replace(lora_rank=0), warn)
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
    tag = model.tag if generation_of(model).adapter_tag_has_moe else str(model.dim)
    return run_dir / f"{run_prefix}_{tag}.pth"


def export_adapters(params, model: ModelConfig, path: pathlib.Path, is_main: bool, say):
    """The adapters of `params` as the reference's `save_lora` file (minimind-3: float16);
    `.pth` needs torch, without it an `.npz` with the same keys is written."""
    adapters = jax.tree.map(on_host, lora.split(params)[0])  # every process takes part
    if not is_main:
        return None
    path = with_torch_or_npz(path)
    lora.save_adapters(adapters, model, path, fp16=generation_of(model).float16_files)
    say(f"LoRA adapters: {path}")
    return path


def finish(config, model: ModelConfig, run_dir: pathlib.Path):
    """(final state) -> None on every process: the adapter file, written by process 0."""
    path = adapter_file(run_dir, config.run.run_prefix, model)
    return lambda state: export_adapters(state.params, model, path,
                                         distributed.is_main_process(), say)


def add_flags(parser) -> None:
    ours, head = (STAGE.defaults[arch]["run_prefix"] for arch in ("minimind2", "minimind3"))
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_name", dest="run_prefix", default=None,
                   help="the adapter's name: run folder OUT_DIR/{lora_name}_{dim}[_moe] and "
                        f"adapter file (default {ours}; --arch minimind3: {head})")
    g.add_argument("--lora_rank", type=int, default=DEFAULT_RANK,
                   help="adapter rank (the references: 16; no alpha scaling either way)")
    g.add_argument("--lora_init_from", default=None,
                   help="start the adapters from this adapter file (the references' "
                        "{linear}.lora.A.weight / .lora.B.weight keys; .pth, .safetensors, "
                        ".npz) instead of a seeded A ~ N(0, 0.02^2), B = 0")


STAGE = Stage(
    name="lora",
    summary="LoRA fine-tuning on SFT JSONL",
    description="LoRA fine-tuning on SFT JSONL (the reference's train_lora.py): rank-16 "
                "adapters on every square projection (wq, wo), base weights frozen (MiniMind2: "
                "OUT_DIR/rlhf_{dim}, minimind-3: full_sft_{hidden}, as a run folder or .pth); "
                "writes the reference's adapter file {lora_name}_{dim}.pth (minimind-3: "
                "float16) into the run folder at the end.",
    samples="sft",
    data_path="./dataset/lora_identity.jsonl",
    # train_lora.py of each (docs/post_training_spec.md 1.2); run_prefix = its --lora_name
    tracker_project="MiniMind-LoRA-SFT",
    defaults={
        "minimind2": dict(epochs=50, batch_size=16, learning_rate=5e-5, accumulation_steps=1,
                          run_prefix="lora_identity"),
        "minimind3": dict(epochs=10, batch_size=32, learning_rate=1e-4, accumulation_steps=1,
                          max_seq_len=340, run_prefix="lora_medical"),
    },
    # the base the reference loads: MiniMind2 out/rlhf_{dim}.pth (its DPO output), minimind-3
    # out/full_sft_{hidden}{_moe}.pth
    start_from={"minimind2": "rlhf", "minimind3": "full_sft"},
    start_rounded_to_float16=True,
    model_for=model_for,
    partition=partition,
    initial_params=initial_params,
    finish=finish,
    add_flags=add_flags,
)
