"""White-box distillation (`minimind-jax distill`): the references' train_distillation.py
(docs/post_training_spec.md section 3).

The student trains on SFT rows against a frozen teacher (any weights `load_weights` reads: a
run folder, .pth, .safetensors, .npz; its own shape, read from the weights). Both see the same
rows; the teacher's logits are cut to the student's vocabulary and take no gradient; a MoE
teacher adds no aux loss. Over the supervised positions (N of them):

    ce      = sum(CE * mask) / sum(mask)  (+ the student's MoE aux)
    distill = T^2 * sum_positions KL(softmax(teacher / T) || softmax(student / T)) / N
    loss    = alpha * ce + (1 - alpha) * distill

MiniMind2 (d9453ed) calls it with its function defaults alpha 0, T 1 (pure KL), its CE also
ignores the pad id 0, and under --recipe minimind2 the loss is not divided by the accumulation
steps (the gradient of a window is the sum of its micro-batches'). minimind-3: --alpha 0.5
--temperature 1.5, CE over sum(mask) + 1e-8. Logged per step besides loss and aux: ce (without
aux) and distill.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.generation import generation_of
from minimind_jax.model.loss import token_cross_entropy
from minimind_jax.train import log_lines
from minimind_jax.train.run_folder import find_saved_weights
from minimind_jax.train.stages.stage import Objective, Stage, StageContext


@dataclasses.dataclass(frozen=True)
class DistillRules:
    """What a generation's train_distillation.py computes, and its defaults."""

    alpha: float  # the CE weight
    temperature: float
    ce_ignores_pad: bool  # its CE also drops targets equal to the pad id 0
    ce_eps: float  # added to the CE's denominator
    # under the generation's own recipe the loss is not divided by the accumulation steps
    undivided: bool
    teacher: str  # the default teacher's weights, OUT_DIR/NAME
    teacher_is_moe: bool  # with --from_teacher_weight / --teacher_hidden_size


RULES = {
    "minimind2": DistillRules(alpha=0.0, temperature=1.0, ce_ignores_pad=True, ce_eps=0.0,
                              undivided=True, teacher="full_sft_768", teacher_is_moe=False),
    "minimind3": DistillRules(alpha=0.5, temperature=1.5, ce_ignores_pad=False, ce_eps=1e-8,
                              undivided=False, teacher="full_sft_768_moe",
                              teacher_is_moe=True),
}


def kl_teacher_student(student_BTV, teacher_BTV, mask_BT, temperature: float):
    """Forward KL(teacher || student) of the temperature-scaled softmaxes, summed over the
    vocabulary and averaged over the masked positions (torch's `kl_div(..., 'batchmean')` over
    the selected rows; no selected row gives NaN, as there)."""
    log_ps = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / temperature, axis=-1)
    p_t = jnp.exp(log_pt)
    kl_BT = jnp.sum(jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0), axis=-1)
    selected = mask_BT > 0
    return jnp.sum(jnp.where(selected, kl_BT, 0.0)) / selected.sum()


def distill_loss_fn(student: ModelConfig, teacher: ModelConfig, *, alpha: float,
                    temperature: float, scale: float = 1.0, ce_ignores_pad: bool = False,
                    ce_eps: float = 0.0):
    """train_step's objective: (params, batch, teacher params) -> (scale * loss, metrics)."""
    from minimind_jax.model.transformer import MiniMind

    student_model, teacher_model = MiniMind(student), MiniMind(teacher)
    vocab = student.vocab_size

    def objective(params, batch: dict, teacher_params):
        extra = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
        logits, aux = student_model.apply({"params": params}, batch["input_ids"], **extra)
        teacher_logits, _ = teacher_model.apply({"params": teacher_params}, batch["input_ids"],
                                                **extra)
        teacher_logits = jax.lax.stop_gradient(teacher_logits[..., :vocab])
        mask = batch["loss_mask"].astype(jnp.float32)
        ce_BT = token_cross_entropy(logits, batch["labels"])
        counted = (mask > 0) & (batch["labels"] != 0) if ce_ignores_pad else mask > 0
        ce = jnp.sum(jnp.where(counted, ce_BT * mask, 0.0)) / (mask.sum() + ce_eps)
        distill = temperature ** 2 * kl_teacher_student(logits, teacher_logits, mask,
                                                        temperature)
        loss = alpha * (ce + aux) + (1 - alpha) * distill
        return scale * loss, {"loss": loss, "aux": aux, "ce": ce, "distill": distill}

    return objective


def load_teacher(path, student: ModelConfig, n_heads: int | None = None):
    """(teacher params, its config, where from): shapes from the weights (a file's n_heads, which
    MiniMind2's keys do not give, from `n_heads` or the student's), numerics as the student."""
    from minimind_jax.model import weights

    base = student.replace(n_heads=n_heads) if n_heads else student
    params, config, origin = weights.load_weights(path, base)
    if generation_of(config) != generation_of(student):
        raise UserError(f"teacher {path} is a {generation_of(config).name} model, the student "
                        f"{generation_of(student).name}: both must be of one family")
    if config.vocab_size < student.vocab_size:
        raise UserError(f"teacher {path} has a vocabulary of {config.vocab_size}, smaller than "
                        f"the student's {student.vocab_size}")
    config = config.replace(dtype=student.dtype, attention_impl=student.attention_impl,
                            moe_impl=student.moe_impl, max_seq_len=student.max_seq_len)
    return params, config, origin


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """The teacher, and the loss's mix (None: the generation's ALPHA_TEMPERATURE)."""

    teacher: str | None = None  # its weights; None: found by name under OUT_DIR
    # minimind-3's naming of the teacher, OUT_DIR/{from_teacher_weight}_{hidden}[_moe]; all
    # None: the reference's default teacher (TEACHER_DEFAULT)
    from_teacher_weight: str | None = None
    teacher_hidden_size: int | None = None
    teacher_use_moe: bool | None = None  # None: a minimind-3 run's teacher is MoE
    teacher_n_heads: int | None = None
    alpha: float | None = None
    temperature: float | None = None


def teacher_path(options: DistillOptions, out_dir: str, rules: DistillRules) -> str:
    """--teacher; else OUT_DIR/{from_teacher_weight}_{teacher_hidden_size}[_moe] (our run
    folder or the reference's .pth); else the reference's default teacher (MiniMind2
    full_sft_768, minimind-3 full_sft_768_moe)."""
    named = options.from_teacher_weight is not None or options.teacher_hidden_size is not None
    if options.teacher:
        if named:
            raise UserError("--teacher and --from_teacher_weight/--teacher_hidden_size: give "
                            "one")
        return options.teacher
    name = rules.teacher
    if named:
        use_moe = (options.teacher_use_moe if options.teacher_use_moe is not None
                   else rules.teacher_is_moe)
        name = (f"{options.from_teacher_weight or 'full_sft'}_"
                f"{options.teacher_hidden_size or 768}" + ("_moe" if use_moe else ""))
    return str(find_saved_weights(out_dir, name, f"the teacher is {name} (no --teacher)"))


def make_objective(context: StageContext) -> Objective:
    """The distillation objective of a run: SFT rows, the frozen teacher, the generation's
    formulas."""
    config, model, options = context.config, context.model, context.options
    generation = context.generation
    rules = RULES[generation.name]
    alpha = rules.alpha if options.alpha is None else options.alpha
    temperature = rules.temperature if options.temperature is None else options.temperature
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise UserError(f"--alpha must be in [0, 1] and --temperature > 0, got {alpha}, "
                        f"{temperature}")
    teacher = teacher_path(options, config.run.out_dir, rules)
    params, teacher_config, origin = load_teacher(teacher, model, options.teacher_n_heads)
    undivided = rules.undivided and config.recipe.name == generation.recipe
    scale = float(config.optim.accumulation_steps) if undivided else 1.0
    loss = distill_loss_fn(model, teacher_config, alpha=alpha, temperature=temperature,
                           scale=scale, ce_ignores_pad=rules.ce_ignores_pad,
                           ce_eps=rules.ce_eps)
    shape = (f"dim {teacher_config.dim}, {teacher_config.n_layers} layers, "
             f"{teacher_config.n_heads}/{teacher_config.n_kv_heads} heads"
             + (", MoE" if teacher_config.use_moe else ""))
    notes = (f"distill: teacher (frozen) {origin} ({shape}); alpha {alpha}, temperature "
             f"{temperature}" + ("; loss not divided by --accumulation_steps (MiniMind2)"
                                 if undivided and scale != 1 else ""),)
    return Objective(loss=loss, frozen=params, packs_rows=True,
                     line=(log_lines.minimind3_distill_line if generation.minimind3_lines
                           else log_lines.minimind2_distill_line),
                     notes=notes)


# --- the command -------------------------------------------------------------------------------

# minimind-3's student/teacher flags -> ours (the student's are the model flags)
STUDENT_FLAGS = {"student_hidden_size": "dim", "student_num_layers": "n_layers",
                 "student_use_moe": "use_moe", "from_student_weight": "from_weight"}


def map_flags(args: argparse.Namespace) -> list[str]:
    """minimind-3's student flags onto ours (an --arch minimind3 run), lines to print."""
    from minimind_jax.train.compat_flags import _rename

    notes: list[str] = []
    given = [f"--{f}" for f in (*STUDENT_FLAGS, "teacher_hidden_size", "teacher_num_layers",
                                "teacher_use_moe", "from_teacher_weight")
             if getattr(args, f) is not None]
    if given and args.arch is None and args.preset is None:
        args.arch = "minimind3"
        notes.append(f"{' '.join(given)}: minimind-3's script flags, so --arch minimind3")
    for old, new in STUDENT_FLAGS.items():
        _rename(args, old, new, notes)
    return notes


def options_from_args(args: argparse.Namespace) -> DistillOptions:
    return DistillOptions(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(DistillOptions)})


def add_flags(parser) -> None:
    from minimind_jax.model import flags as model_flags
    from minimind_jax.train import compat_flags

    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher", default=None,
                   help="the teacher's weights: a run folder, .pth, .safetensors or .npz "
                        "(default: OUT_DIR/full_sft_768, --arch minimind3: "
                        "OUT_DIR/full_sft_768_moe; folder or .pth)")
    g.add_argument("--teacher_n_heads", type=int, default=None,
                   help="the teacher's attention heads where its weights do not say "
                        "(MiniMind2 .pth/.npz files; default: the student's)")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the CE loss (default 0.0, MiniMind2's; --arch minimind3: "
                        "0.5)")
    g.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature of the KL term (default 1.0; --arch minimind3: "
                        "1.5)")
    r = parser.add_argument_group(compat_flags.GROUP_TITLE + ": distillation")
    for flag, ours in STUDENT_FLAGS.items():
        kind = {"student_use_moe": model_flags.parse_flag_bool,
                "from_student_weight": str}.get(flag, int)
        r.add_argument(f"--{flag}", type=kind, default=None,
                       help=f"minimind-3's name of --{ours}")
    r.add_argument("--teacher_hidden_size", type=int, default=None,
                   help="minimind-3: with --from_teacher_weight, the teacher is "
                        "OUT_DIR/NAME_{this}[_moe]")
    r.add_argument("--teacher_num_layers", type=int, default=None,
                   help="accepted; the teacher's layers are read from its weights")
    r.add_argument("--teacher_use_moe", type=model_flags.parse_flag_bool, default=None,
                   help="minimind-3: whether the teacher file name has _moe")
    r.add_argument("--from_teacher_weight", default=None, metavar="NAME",
                   help="minimind-3: the teacher is OUT_DIR/NAME_{teacher_hidden_size}[_moe]")


STAGE = Stage(
    name="distill",
    summary="White-box distillation of a student from a frozen teacher",
    description="Distillation on SFT data (the references' train_distillation.py): the "
                "student starts from the SFT weights (default OUT_DIR/full_sft_{dim}[_moe]) "
                "and learns alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) over "
                "the supervised tokens from a frozen --teacher of any size. --arch "
                "minimind2: alpha 0, T 1 (pure KL; under --recipe minimind2 the loss is "
                "not divided by --accumulation_steps, as there); --arch minimind3: alpha "
                "0.5, T 1.5. Run folder OUT_DIR/full_dist_{dim}[_moe]; metrics.jsonl logs "
                "loss, ce, distill and aux.",
    samples="sft",
    data_path="./dataset/sft_data.jsonl",
    # train_distillation.py of each (docs/post_training_spec.md 3.3)
    tracker_project="MiniMind-Dist-SFT",
    defaults={
        "minimind2": dict(epochs=6, batch_size=32, learning_rate=5e-6, accumulation_steps=1,
                          remat=True, max_seq_len=512, run_prefix="full_dist"),
        "minimind3": dict(epochs=6, batch_size=32, learning_rate=5e-6, accumulation_steps=1,
                          remat=True, max_seq_len=340, run_prefix="full_dist"),
    },
    start_from={"minimind2": "full_sft", "minimind3": "full_sft"},
    validates=False,
    options=DistillOptions(),
    objective=make_objective,
    add_flags=add_flags,
    options_from_args=options_from_args,
    map_flags=map_flags,
)
