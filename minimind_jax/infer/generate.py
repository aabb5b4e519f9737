"""Text generation: `generate` (batch of prompts) and `chat` (interactive, streamed).

One jit-compiled function per (batch, prompt bucket, max_new_tokens, sampling mode): a prefill
over the left-padded prompts fills the KV cache, then a `lax.while_loop` decodes one token per
iteration until every row has produced EOS or `max_new_tokens` are out (sampling:
infer/sampling.py). Streaming prints from inside the loop via `io_callback`, so
a chat turn is the same compiled program as a batch call.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from minimind_jax.errors import UserError
from minimind_jax.infer.infer_config import (
    GenerateConfig,
    LoadConfig,
    add_load_args,
    field_flag,
)
from minimind_jax.infer.reply_text import split_opened_thinking, split_thinking
from minimind_jax.infer.sampling import SamplingConfig, next_token
from minimind_jax.model import flags as model_flags
from minimind_jax.model import lora, weights
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind, init_cache
from minimind_jax.runtime.xla_flags import jit_for_decoding

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: fewer distinct compilations


def left_pad(prompts: list[list[int]], bucket: int = PROMPT_BUCKET,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, P], valid [B, P]) right-aligned, P rounded up to `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt must have at least one token")
    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt):] = prompt
        valid[row, P - len(prompt):] = True
    return ids, valid


@jit_for_decoding(static_argnames=("config", "max_new_tokens", "greedy", "on_tokens"))
def _generate_padded(params, ids_BP, valid_BP, rng, sampling: dict, eos_id, *,
                     config: ModelConfig, max_new_tokens: int, greedy: bool,
                     on_tokens: Callable | None):
    """Prefill + while-loop decode. Returns (tokens [B, N] with pad 0 after EOS, lengths [B])."""
    model = MiniMind(config)
    B, P = ids_BP.shape
    segment_BP = valid_BP.astype(jnp.int32)  # 0 = left padding, never attended to
    positions_BP = jnp.maximum(jnp.cumsum(segment_BP, axis=1) - 1, 0)
    cache = init_cache(config, B, P + max_new_tokens)
    logits_BPV, _, cache = model.apply({"params": params}, ids_BP, positions=positions_BP,
                                       segment_ids=segment_BP, cache=cache)
    seen_BV = jnp.zeros((B, config.vocab_size), jnp.int32)
    seen_BV = seen_BV.at[jnp.arange(B)[:, None], ids_BP].add(segment_BP) > 0

    def host_step(token_B, done_B):
        stop_B = on_tokens(token_B, done_B)
        return np.zeros(B, bool) if stop_B is None else np.asarray(stop_B, bool)

    def emit(token_B, done_B, seen_BV):
        """Record the token picked at `step` (pad for rows already finished); rows finish at
        EOS or when the host callback asks them to stop."""
        token_B = jnp.where(done_B, 0, token_B)
        new_done_B = done_B | (token_B == eos_id)
        if on_tokens is not None:
            new_done_B |= io_callback(host_step, jax.ShapeDtypeStruct((B,), jnp.bool_),
                                      token_B, done_B, ordered=True)
        seen_BV = seen_BV.at[jnp.arange(B), token_B].set(True)
        return token_B, new_done_B, seen_BV

    rng, first_rng = jax.random.split(rng)
    done_B = jnp.zeros((B,), bool)
    token_B = next_token(logits_BPV[:, -1], seen_BV, first_rng, sampling, greedy)
    token_B, new_done_B, seen_BV = emit(token_B, done_B, seen_BV)
    tokens_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
    lengths_B = jnp.ones((B,), jnp.int32)
    next_pos_B = positions_BP[:, -1] + 1

    def cond(state):
        step, _, done_B, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        step, token_B, done_B, tokens_BN, lengths_B, seen_BV, cache, rng = state
        logits_B1V, _, cache = model.apply(
            {"params": params}, token_B[:, None], positions=(next_pos_B + step - 1)[:, None],
            segment_ids=jnp.ones((B, 1), jnp.int32), cache=cache)
        rng, step_rng = jax.random.split(rng)
        new_B = next_token(logits_B1V[:, 0], seen_BV, step_rng, sampling, greedy)
        new_B, new_done_B, seen_BV = emit(new_B, done_B, seen_BV)
        tokens_BN = tokens_BN.at[:, step].set(new_B)
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        return step + 1, new_B, new_done_B, tokens_BN, lengths_B, seen_BV, cache, rng

    state = (jnp.int32(1), token_B, new_done_B, tokens_BN, lengths_B, seen_BV, cache, rng)
    _, _, _, tokens_BN, lengths_B, *_ = jax.lax.while_loop(cond, body, state)
    return tokens_BN, lengths_B


def generate_tokens(params, config: ModelConfig, prompts: list[list[int]],
                    sampling: SamplingConfig | None = None, eos_id: int | None = 2,
                    seed: int = 0, on_tokens: Callable | None = None,
                    prompt_bucket: int = PROMPT_BUCKET) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, up to and including EOS.

    `on_tokens(tokens_B, done_B)` (numpy arrays) is called after every decode step, from inside
    the compiled loop, for streaming; pass the same callable each time to reuse the compilation.
    It may return a bool mask of rows to stop after this token (None: none), e.g. rows whose
    reader went away or reached its own token limit. The prompts are left-padded to a multiple
    of `prompt_bucket` tokens.
    """
    sampling = sampling or SamplingConfig()
    ids_BP, valid_BP = left_pad(prompts, prompt_bucket)
    scalars = {"temperature": jnp.float32(max(sampling.temperature, 1e-6)),
               "top_p": jnp.float32(sampling.top_p), "top_k": jnp.int32(sampling.top_k),
               "repetition_penalty": jnp.float32(sampling.repetition_penalty)}
    tokens_BN, lengths_B = _generate_padded(
        params, jnp.asarray(ids_BP), jnp.asarray(valid_BP), jax.random.PRNGKey(seed), scalars,
        jnp.int32(-1 if eos_id is None else eos_id), config=config,
        max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy, on_tokens=on_tokens)
    tokens_BN, lengths_B = np.asarray(tokens_BN), np.asarray(lengths_B)
    return [tokens_BN[b, :lengths_B[b]].tolist() for b in range(len(prompts))]


class TextStreamer:
    """Prints one row's new text as tokens arrive, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer, row: int = 0, out=None):
        self.tokenizer, self.row, self._out = tokenizer, row, out
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, tokens_B: np.ndarray, done_B: np.ndarray) -> None:
        if done_B[self.row] or int(tokens_B[self.row]) == self.tokenizer.eos_id:
            return
        self.tokens.append(int(tokens_B[self.row]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a multi-byte character split across tokens: wait for the rest
        out = self._out or sys.stdout  # looked up late: the stream may be redirected meanwhile
        out.write(text[self.printed:])
        out.flush()
        self.printed = len(text)


# ---------------------------------------------------------------- loading models and prompts


def _checkpoint(load: LoadConfig) -> pathlib.Path:
    ckpt = pathlib.Path(load.ckpt)
    if not ckpt.exists():
        raise UserError(f"checkpoint not found: {ckpt}")
    return ckpt


def load_model(load: LoadConfig) -> tuple[dict, ModelConfig]:
    """The commands' model: `weights.load_weights` of `load.ckpt` (shapes from the weights, the
    rest from `load.model`) with `load.lora_weight`'s adapters, computing in `load.dtype`."""
    params, config, _ = weights.load_weights(_checkpoint(load), load.model, dtype=load.dtype)
    if load.lora_weight:
        params, config = lora.attach_adapter_file(params, config, load.lora_weight)
    return params, config


def tokenizer_of(load: LoadConfig):
    """The commands' tokenizer: `load.tokenizer`, else the one saved beside `load.ckpt`."""
    from minimind_jax.data.tokenizer import beside_weights, load_tokenizer, locate_tokenizer

    ckpt = _checkpoint(load)  # first: a missing checkpoint is why no tokenizer is beside it
    return load_tokenizer(locate_tokenizer(load.tokenizer, beside_weights(ckpt),
                                           what=f"the checkpoint {ckpt}"))


def encode_prompt(tokenizer, text: str, template: bool, system: str | None = None,
                  history: list[dict] | None = None, think: bool = False) -> list[int]:
    """Chat-template a user turn (with history) and the generation prompt, or `<s>` + raw text
    for pretrained models. `think` opens a reasoning block (minimind-3's `open_thinking`;
    without it that template closes an empty one, as minimind-3's eval_llm.py does by default)."""
    if template:
        messages = ([{"role": "system", "content": system}] if system else []) + (history or [])
        messages = messages + [{"role": "user", "content": text}]
        extra = {"open_thinking": True} if think else {}
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                              **extra))
    return [tokenizer.bos_id] + tokenizer.encode(text)


def check_think_flag(tokenizer, config: GenerateConfig) -> None:
    if config.think and (config.raw
                         or "open_thinking" not in tokenizer.chat_template_variables):
        raise UserError("--think needs a chat template with a thinking switch (minimind-3's "
                        "open_thinking)" + ("; --raw has no template" if config.raw else ""))


def answer_text(tokenizer, new: list[int]) -> str:
    """The text of generated tokens, the end-of-sequence token and other special tokens left
    out (as both references decode a reply: skip_special_tokens=True)."""
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id], skip_special_tokens=True)


# ---------------------------------------------------------------- commands


def run_generate(args: argparse.Namespace) -> int:
    """The `generate` command: its prompts, then its flags read once into a GenerateConfig."""
    prompts = read_prompts(args.prompt or [], args.prompt_file)
    return answer_prompts(GenerateConfig.from_args(args), prompts, args.jsonl, args.output)


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """The prompts given one by one, then the non-blank lines of `prompt_file`."""
    prompts = list(prompts)
    if prompt_file:
        try:
            text = pathlib.Path(prompt_file).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"{prompt_file}: cannot read ({err.strerror})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt_file")
    return prompts


def answer_prompts(config: GenerateConfig, prompts: list[str], jsonl: bool = False,
                   output: str | None = None) -> int:
    """Answer the prompts in one batch; print each answer as text, or as a JSON line
    (`jsonl`), and/or write those lines to `output`."""
    tokenizer = tokenizer_of(config.load)
    check_think_flag(tokenizer, config)
    params, model_config = load_model(config.load)
    ids = [encode_prompt(tokenizer, p, not config.raw, config.system, think=config.think)
           for p in prompts]
    start = time.perf_counter()
    outputs = generate_tokens(params, model_config, ids, config.sampling, tokenizer.eos_id,
                              config.seed)
    seconds = time.perf_counter() - start
    results = [answer_record(prompt, prompt_ids, new, tokenizer, config.sampling, seconds,
                             len(prompts), think=config.think)
               for prompt, prompt_ids, new in zip(prompts, ids, outputs, strict=True)]
    if output:
        write_records(output, results)
    for result in results:
        if jsonl:
            print(json.dumps(result, ensure_ascii=False))
        elif not output:
            thinking = f"thinking: {result['thinking']}\n" if "thinking" in result else ""
            print(f"prompt: {result['prompt']}\n{thinking}answer: {result['answer']}\n")
    n_new = sum(len(o) for o in outputs)
    print(f"[{len(prompts)} prompts, {n_new} new tokens in {seconds:.2f}s incl. compilation]",
          file=sys.stderr)
    return 0


def answer_record(prompt: str, prompt_ids: list[int], new: list[int], tokenizer,
                  sampling: SamplingConfig, seconds: float, batch_size: int,
                  think: bool = False) -> dict:
    """One prompt's result (printed, or a line of `--jsonl` / `--output`); `thinking` only when
    the answer has a reasoning block."""
    text = answer_text(tokenizer, new)
    # with --think the prompt opened the block: all is reasoning until </think>
    reasoning, answer = split_opened_thinking(text)[:2] if think else split_thinking(text)
    stopped = "eos" if new and new[-1] == tokenizer.eos_id else "max_new_tokens"
    record = {"prompt": prompt, "answer": answer}
    if reasoning is not None:
        record["thinking"] = reasoning
    return {**record, "prompt_tokens": len(prompt_ids), "new_tokens": len(new),
            "stopped": stopped, "temperature": sampling.temperature, "batch_size": batch_size,
            "batch_seconds": round(seconds, 4)}


def write_records(path: str, records: list[dict]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as err:
        raise UserError(f"{path}: cannot write ({err.strerror})") from None


def run_chat(args: argparse.Namespace) -> int:
    """The `chat` command: its flags read once into a GenerateConfig."""
    return chat(GenerateConfig.from_args(args), args.history)


def chat(config: GenerateConfig, history_messages: int = 0) -> int:
    """Talk on the terminal until an empty line or end of input, keeping the last
    `history_messages` messages in each prompt; each turn's seed is the last one's + 1."""
    tokenizer = tokenizer_of(config.load)
    check_think_flag(tokenizer, config)
    params, model_config = load_model(config.load)
    streamer = TextStreamer(tokenizer)
    history: list[dict] = []
    print("chat with the model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    seed = config.seed
    while True:
        try:
            question = input("you: ").strip()
        except EOFError:
            print()
            return 0
        if not question:
            return 0
        ids = encode_prompt(tokenizer, question, not config.raw, config.system,
                            history[-history_messages:] if history_messages else [],
                            config.think)
        print("model: ", end="", flush=True)
        streamer.reset()
        new = generate_tokens(params, model_config, [ids], config.sampling, tokenizer.eos_id,
                              seed, on_tokens=streamer)[0]
        # streamed as written, `</think>` included; the template takes the reasoning apart
        # again when this answer is history (minimind-3's eval_llm.py keeps it the same way)
        answer = answer_text(tokenizer, new)
        print(answer[streamer.printed:], flush=True)
        history += [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        seed += 1


def _add_common(parser: argparse.ArgumentParser) -> None:
    """GenerateConfig's flags (those of its LoadConfig and SamplingConfig included)."""
    add_load_args(parser, "our checkpoint directory, or reference weights (.pth, .safetensors, "
                          ".npz; shapes read from the file, --n_heads from the flags)")
    field_flag(parser, SamplingConfig, "max_new_tokens", "tokens to generate")
    field_flag(parser, SamplingConfig, "temperature", "softmax temperature; 0 = greedy")
    field_flag(parser, SamplingConfig, "top_p", "nucleus sampling mass (1 = off)")
    field_flag(parser, SamplingConfig, "top_k", "keep the k likeliest tokens (0 = off)")
    field_flag(parser, SamplingConfig, "repetition_penalty",
               "Hugging Face-style penalty for tokens already present (1 = off)")
    field_flag(parser, GenerateConfig, "seed", "sampling seed")
    field_flag(parser, GenerateConfig, "raw",
               "no chat template: '<s>' + prompt (for pretrained-only models)")
    field_flag(parser, GenerateConfig, "system",
               "system prompt (default: the template's own: MiniMind2's built-in one, none for "
               "minimind-3)")
    field_flag(parser, GenerateConfig, "think",
               "minimind-3: open a <think> block for the model to reason in (its "
               "open_thinking); by default the template closes an empty one")
    model_flags.add_model_args(parser)


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", formatter_class=model_flags.HelpFormatter,
        help="answer prompts with a trained model (batched, KV-cached)",
        description=__doc__ + "\nexample:\n  minimind-jax generate --ckpt out/sft --prompt "
                              "'你好' --prompt '介绍一下你自己'",
    )
    _add_common(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--prompt_file", default=None, help="a text file with one prompt per line")
    gen.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per prompt instead of text: prompt, answer, "
                          "prompt_tokens, new_tokens, stopped (eos|max_new_tokens), "
                          "temperature, batch_size, batch_seconds (the whole batched call, "
                          "compilation included)")
    gen.add_argument("--output", default=None, metavar="FILE.jsonl",
                     help="write those JSON objects to this file (one per line)")
    gen.set_defaults(func=run_generate, compile_cache=True)

    chat = subparsers.add_parser(
        "chat", formatter_class=model_flags.HelpFormatter,
        help="talk to a trained model interactively (streamed)",
        description="Interactive chat: applies the chat template, streams tokens as they come."
                    "\n\nexample:\n  minimind-jax chat --ckpt out/sft",
    )
    _add_common(chat)
    chat.add_argument("--history", type=int, default=0,
                      help="earlier messages to keep in the prompt (even: question + answer)")
    chat.set_defaults(func=run_chat, compile_cache=True)
