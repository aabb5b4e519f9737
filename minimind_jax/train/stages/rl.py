"""What minimind-3's RL stages (grpo, ppo) share (shared/SPEC_RL.md 1): the rollout settings,
flags and engines, the per-token log-probs of a completion under a masked forward, the
completion mask, the old log-probs, and the scripts' CosineAnnealingLR."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.infer import rollout as rollouts
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.loss import token_cross_entropy

ENGINES = ("torch", "sglang")  # the scripts' choices; torch = our own sampler here
# the reference model's RoPE table (minimind-3's max_position_embeddings): prompt + completion
MAX_POSITIONS = 32768
DEFAULT_REWARD_MODEL = "../../internlm2-1_8b-reward"  # the scripts' default


def check_rollout_options(options, model: ModelConfig) -> None:
    """One clear error per bad rollout setting (`options` has max_gen_len, thinking_ratio and
    rollout_engine), before anything is created."""
    if options.rollout_engine == "sglang":
        raise UserError("--rollout_engine sglang: this port samples with its own KV-cache "
                        "decoder on the current weights; drop the flag (the --sglang_* flags "
                        "are accepted and ignored)")
    if options.max_gen_len < 1:
        raise UserError(f"--max_gen_len must be >= 1, got {options.max_gen_len}")
    if model.max_seq_len + options.max_gen_len > MAX_POSITIONS:
        raise UserError(f"--max_seq_len {model.max_seq_len} + --max_gen_len "
                        f"{options.max_gen_len} is past the {MAX_POSITIONS} positions of "
                        "minimind-3's model; shorten the prompts or the completions")
    if not 0.0 <= options.thinking_ratio <= 1.0:
        raise UserError(f"--thinking_ratio must be in [0, 1], got {options.thinking_ratio}")


def add_rollout_flags(g, defaults) -> None:
    """The scripts' rollout and reward flags (and the accepted-but-unused ones) on group `g`."""
    g.add_argument("--max_gen_len", type=int, default=defaults.max_gen_len,
                   help="most new tokens per completion (--max_seq_len caps the prompt)")
    g.add_argument("--thinking_ratio", type=float, default=defaults.thinking_ratio,
                   help="share of prompts whose template opens thinking")
    g.add_argument("--reward_model_path", default=defaults.reward_model_path,
                   help="a Hugging Face reward model folder (get_score, e.g. "
                        "internlm2-1_8b-reward; needs torch and transformers), or `none` for "
                        "the rule rewards alone")
    g.add_argument("--rollout_engine", choices=ENGINES, default=defaults.rollout_engine,
                   help="torch: our own sampler on the current weights (sglang is refused)")
    g.add_argument("--replay", default=None, metavar="NPZ",
                   help="replay the rollouts recorded in a golden file (micro{i}/output_ids) "
                        "instead of sampling: an exact comparison with the reference")
    for flag in ("sglang_base_url", "sglang_model_path", "sglang_shared_path"):
        g.add_argument(f"--{flag}", default=None, help="accepted; SGLang is not used")
    g.add_argument("--debug_mode", action="store_true", help="accepted; see metrics.jsonl")
    g.add_argument("--debug_interval", type=int, default=20, help="accepted")


def rollout_options(args) -> dict:
    """The rollout fields of a stage's options, from `add_rollout_flags`' flags."""
    return dict(max_gen_len=args.max_gen_len, thinking_ratio=args.thinking_ratio,
                reward_model_path=args.reward_model_path, rollout_engine=args.rollout_engine,
                replay=args.replay)


# completion positions whose logits exist at once: the scripts' log_softmax over the whole
# [N, L, V] (SPEC_RL 10: out of memory on 8-24 GB cards) becomes chunks of [N, C, V], also in
# the backward pass (each chunk is recomputed there)
LOGP_CHUNK = 256
# tokens of one pass of the model: a dense model's rows go through in slices of about this many
# tokens (a scan over slices, whose backward pass holds one slice's activations at a time);
# GRPO at the scripts' defaults, 12 rows of 1,070 tokens, goes in 4 slices of 3
PASS_TOKENS = 4096


def row_slices(config: ModelConfig, rows: int, width: int,
               pass_tokens: int = PASS_TOKENS) -> int:
    """How many equal slices `completion_logps` cuts `rows` rows of `width` tokens into: the
    fewest (a divisor of `rows`) with at most `pass_tokens` tokens each, or as near as rows
    allow; 1 for MoE, whose aux loss is one figure over the whole batch's tokens."""
    if config.use_moe:
        return 1
    wanted = -(-rows * width // pass_tokens)
    return next((n for n in range(max(wanted, 1), rows + 1) if rows % n == 0), rows)


def completion_logps(model, params, ids_NL, segment_NL, logp_pos_NR, chunk: int = LOGP_CHUNK,
                     pass_tokens: int = PASS_TOKENS):
    """(per-token log-probs of the completion under `params`, MoE aux): the scripts' masked
    forward on prompt + completion, log softmax(logits)[next id] in float32 at the completion's
    positions only, `chunk` positions at a time; a dense model's rows in `row_slices` slices.
    Each row's log-probs depend on that row alone, so slicing changes no figure."""
    N, L = ids_NL.shape
    slices = row_slices(model.config, N, L, pass_tokens)
    if slices == 1:
        return _completion_logps(model, params, ids_NL, segment_NL, logp_pos_NR, chunk)
    # slice s holds rows s, s + S, s + 2S, ...: each slice draws on every device's rows
    split = lambda x: x.reshape(N // slices, slices, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    logp_SnR, aux_S = jax.lax.map(
        lambda rows: _completion_logps(model, params, *rows, chunk),
        (split(ids_NL), split(segment_NL), split(logp_pos_NR)))
    return logp_SnR.swapaxes(0, 1).reshape(N, -1), aux_S[0]  # a dense model's aux: 0


def _completion_logps(model, params, ids_NL, segment_NL, logp_pos_NR, chunk: int):
    h_NLD, aux = model.apply({"params": params}, ids_NL, segment_ids=segment_NL, hidden=True)
    N, R = logp_pos_NR.shape
    n_chunks = -(-R // chunk) if chunk < R else 1
    width = -(-R // n_chunks)
    pos_NR = jnp.pad(logp_pos_NR, ((0, 0), (0, n_chunks * width - R)), mode="edge")
    h_NRD = jnp.take_along_axis(h_NLD, pos_NR[..., None], axis=1)
    next_NR = jnp.take_along_axis(ids_NL, pos_NR + 1, axis=1)
    embedding_VD = params["tok_embeddings"].astype(model.config.dtype)

    @jax.checkpoint
    def logps(h_NCD, next_NC):
        logits_NCV = jnp.dot(h_NCD, embedding_VD.T, preferred_element_type=jnp.float32)
        return -token_cross_entropy(logits_NCV, next_NC)

    if n_chunks == 1:
        return logps(h_NRD, next_NR)[:, :R], aux
    split = lambda x: jnp.moveaxis(x.reshape(N, n_chunks, width, *x.shape[2:]), 1, 0)  # noqa: E731
    logp_KNC = jax.lax.map(lambda args: logps(*args), (split(h_NRD), split(next_NR)))
    return jnp.moveaxis(logp_KNC, 0, 1).reshape(N, n_chunks * width)[:, :R], aux


def old_logps_fn(config: ModelConfig):
    """A jitted `(params, ids, segment ids, positions) -> per-token log-probs` (no grad)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)

    @jax.jit
    def old_logps(params, ids, seg, pos):
        return completion_logps(model, params, ids, seg, pos)[0]

    return old_logps


def completion_mask(completion_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """1 up to and including each row's first EOS (all of a row without one), float32."""
    is_eos = completion_ids == eos_id
    width = completion_ids.shape[1]
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), width - 1)
    return (np.arange(width)[None] <= first[:, None]).astype(np.float32)


def rollout_rows(result: rollouts.Rollout, pad_id: int) -> dict[str, np.ndarray]:
    """The masked forward's inputs of a rollout: ids, segment ids (0 on padding) and the
    completion's log-prob positions P - 1 + t (the column index)."""
    ids = result.output_ids
    P, R = result.prompt_len, ids.shape[1] - result.prompt_len
    seg = (ids != pad_id).astype(np.int32)
    pos = np.broadcast_to(P - 1 + np.arange(R, dtype=np.int32), (len(ids), R)).copy()
    return {"input_ids": ids, "segment_ids": seg, "logp_pos": pos}


# a rollout's completions are padded on the right to a multiple of max_gen_len / WIDTH_BUCKETS,
# and its rows (prompt + completion) to a multiple of the longest row / WIDTH_BUCKETS: a handful
# of programs for the old log-probs and the train step, not one per (prompt width, completion
# length), as sampling gives
WIDTH_BUCKETS = 8


def padded_width(width: int, longest: int, n: int = WIDTH_BUCKETS) -> int:
    """The smallest multiple of ceil(longest / n) (rounded up to 16) that holds `width`."""
    step = 16 * math.ceil(longest / n / 16)
    return step * math.ceil(width / step)


def widened(rows: dict[str, np.ndarray], completion_mask_NR: np.ndarray, completion_width: int,
            row_width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`rollout_rows` and the completion mask with more columns: completions up to
    `completion_width` (log-prob positions going on, mask 0), rows up to `row_width` (at least
    prompt + `completion_width`) with padding (id 0, segment 0) that no query sees. The same
    losses as the exact widths for a dense model (causal, every sum masked); not for MoE, whose
    aux loss counts every position."""
    N, R = completion_mask_NR.shape
    P = rows["input_ids"].shape[1] - R
    if row_width < P + completion_width or completion_width < R:
        raise ValueError(f"widening rows of {P} + {R} columns to {row_width} / "
                         f"{completion_width}")
    pad = lambda x, width: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    positions = np.broadcast_to(P - 1 + np.arange(completion_width, dtype=np.int32),
                                (N, completion_width)).copy()
    return ({"input_ids": pad(rows["input_ids"], row_width),
             "segment_ids": pad(rows["segment_ids"], row_width), "logp_pos": positions},
            pad(completion_mask_NR, completion_width))


def recorded(path: str) -> np.lib.npyio.NpzFile:
    """A golden maker's recording (`n_micro`, `micro{i}/output_ids`, ...), or UserError."""
    try:
        recording = np.load(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--replay {path}: cannot read it ({err})") from None
    steps = int(recording["n_micro"]) if "n_micro" in recording.files else 0
    if not steps:
        raise UserError(f"--replay {path}: no recorded rollouts (micro{{i}}/output_ids)")
    return recording


def recorded_outputs(path: str) -> list[np.ndarray]:
    """The output ids a golden maker recorded per rollout (`micro{i}/output_ids`)."""
    recording = recorded(path)
    return [recording[f"micro{i}/output_ids"] for i in range(int(recording["n_micro"]))]


def engine(context, options, script: tuple[str, ...] = ()):
    """The run's rollout engine: a replay of `options.replay`, canned `script` texts, or our
    sampler on the current weights."""
    if options.replay:
        return rollouts.ReplayEngine(recorded_outputs(options.replay), context.tokenizer)
    if script:
        return rollouts.ScriptEngine(script, context.tokenizer)
    return rollouts.SamplingEngine(context.model, context.tokenizer, context.config.seed)


def annealed_lr(learning_rate: float, total_updates: int, updates_done: int) -> float:
    """torch's CosineAnnealingLR(T_max=total_updates, eta_min=lr/10) after `updates_done`."""
    return learning_rate / 10 + 0.9 * learning_rate * (
        1 + math.cos(math.pi * updates_done / total_updates)) / 2
