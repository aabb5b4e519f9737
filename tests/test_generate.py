"""Generation: KV-cached batched decoding equals full recomputation; sampling filters match HF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.infer import generate as gen
from minimind_jax.infer.sampling import apply_repetition_penalty, filter_top_k_top_p
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind, init_params
from tests.helpers import (
    TINY_CONFIG,
    TOKENIZER_DIR,
    answer_by_hf_tokenizers,
    golden_state_dict,
    greedy_by_recomputation,
)

TINY = TINY_CONFIG.replace(vocab_size=256)


def sharpened_params(config, seed=0, scale=4.0):
    """Random params with the linear kernels scaled up: a fresh tiny model mostly repeats its
    input token (tied embeddings), which would make a token-for-token test too easy."""
    params = init_params(config, seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if "embeddings" not in jax.tree_util.keystr(path) else x, params)


@pytest.mark.parametrize("config", [
    TINY,
    TINY.replace(use_moe=True, moe_impl="ragged", scan_layers=True),
], ids=["dense", "moe_scan"])
def test_cached_greedy_batch_equals_full_recomputation(config):
    params = sharpened_params(config)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 17, 1, 9)]
    n_new = 20
    sampling = gen.SamplingConfig(temperature=0.0, max_new_tokens=n_new)
    got = gen.generate_tokens(params, config, prompts, sampling, eos_id=None)
    for prompt, tokens in zip(prompts, got, strict=True):
        expected = greedy_by_recomputation(params, config, prompt, n_new, width=64)
        assert tokens == expected
    assert len({t for tokens in got for t in tokens}) > 20  # not a degenerate repeat


def test_eos_stops_each_row_and_streaming_sees_the_same_tokens():
    params = sharpened_params(TINY)
    prompts = [[5, 6, 7], [100, 3, 9, 40, 41, 42]]
    sampling = gen.SamplingConfig(temperature=0.0, max_new_tokens=12)
    free = gen.generate_tokens(params, TINY, prompts, sampling, eos_id=None)
    eos = free[0][4]  # row 0 emits this at step 4 (maybe earlier too)
    streamed = []
    stopped = gen.generate_tokens(params, TINY, prompts, sampling, eos_id=eos,
                                  on_tokens=lambda t, d: streamed.append((t.copy(), d.copy())))
    for row in range(2):
        cut = free[row].index(eos) + 1 if eos in free[row] else len(free[row])
        assert stopped[row] == free[row][:cut]
    assert len(streamed) == max(len(s) for s in stopped)
    for row in range(2):
        live = [int(t[row]) for t, done in streamed if not done[row]]
        assert live == stopped[row]


def test_no_recompilation_across_prompts_and_sampling_settings():
    params = init_params(TINY, 1)
    sampling = gen.SamplingConfig(temperature=0.7, top_p=0.9, top_k=10, max_new_tokens=8)
    gen.generate_tokens(params, TINY, [[1, 2, 3], [4, 5]], sampling, seed=0)
    before = gen._generate_padded.jitted._cache_size()
    other = gen.SamplingConfig(temperature=1.3, top_p=0.5, top_k=3, repetition_penalty=1.2,
                               max_new_tokens=8)
    out = gen.generate_tokens(params, TINY, [[9, 8, 7, 6, 5], [4]], other, seed=1)
    assert gen._generate_padded.jitted._cache_size() == before
    assert [len(o) for o in out] == [8, 8]


def test_sampling_respects_top_k():
    params = sharpened_params(TINY)
    forward = MiniMind(TINY).apply({"params": params}, jnp.asarray([[5, 6, 7]]))[0]
    allowed = set(np.argsort(-np.asarray(forward[0, -1]))[:2].tolist())
    sampling = gen.SamplingConfig(temperature=5.0, top_p=1.0, top_k=2, max_new_tokens=1)
    firsts = {gen.generate_tokens(params, TINY, [[5, 6, 7]], sampling, eos_id=None, seed=s)[0][0]
              for s in range(12)}
    assert firsts <= allowed and len(firsts) == 2


def test_filters_match_hugging_face_warpers():
    torch = pytest.importorskip("torch")
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.RandomState(3)
    logits = (rng.randn(4, 50) * 3).astype(np.float32)
    ids = rng.randint(0, 50, (4, 7))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    hf = logits_process.RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor(ids), torch.tensor(logits)).numpy()
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3))
    np.testing.assert_allclose(ours, hf, rtol=1e-6)
    for top_k, top_p in [(0, 0.6), (5, 1.0), (8, 0.3), (0, 1.0)]:
        expected = torch.tensor(logits)
        if top_k:
            expected = logits_process.TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = logits_process.TopPLogitsWarper(top_p)(None, expected)
        got = np.asarray(filter_top_k_top_p(jnp.asarray(logits), top_k, top_p))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected.numpy()))
        np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(got)])


def test_top_p_known_numbers():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = ~np.isinf(np.asarray(filter_top_k_top_p(logits, 0, 0.7)))
    assert kept.tolist() == [[False, True, False, True]]  # 0.5 + 0.3 reaches 0.7
    kept = ~np.isinf(np.asarray(filter_top_k_top_p(logits, 0, 0.01)))
    assert kept.tolist() == [[False, True, False, False]]  # the top token always stays


def test_bad_sampling_settings_are_user_errors():
    from minimind_jax.errors import UserError

    with pytest.raises(UserError, match="top_p"):
        gen.SamplingConfig(top_p=0.0)
    with pytest.raises(UserError, match="at least one token"):
        gen.left_pad([[1, 2], []])


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory, golden):
    """The reference's tiny dense model after its 30 pretrain updates, as an .npz state dict."""
    path = tmp_path_factory.mktemp("weights") / "pretrain_64.npz"
    np.savez(path, **golden_state_dict(golden, "dense/after_pretrain/"))
    return path


def test_generate_command_on_reference_weights(reference_npz, golden, capsys):
    """`generate --raw` of two prompts in one batch on the reference's pretrained weights
    prints, for each, the text of the greedy tokens that a full recomputation per token (no
    cache, no padding of the shorter prompt) gives, decoded by the `tokenizers` library."""
    from minimind_jax import cli
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.model import weights

    prompts = ["床前明月光", "白日依山尽，黄河入海流"]
    code = cli.main(["generate", "--ckpt", str(reference_npz), "--tokenizer", str(TOKENIZER_DIR),
                     "--n_heads", "4", "--raw", "--temperature", "0", "--max_new_tokens", "6",
                     "--dtype", "float32", *(f for p in prompts for f in ("--prompt", p))])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    params = weights.params_from_state_dict(
        golden_state_dict(golden, "dense/after_pretrain/"), TINY_CONFIG)
    expected = ""
    for prompt in prompts:
        new = greedy_by_recomputation(params, TINY_CONFIG, gen.encode_prompt(
            tokenizer, prompt, template=False), 6, eos_id=tokenizer.eos_id)
        answer = answer_by_hf_tokenizers(TOKENIZER_DIR, new, tokenizer.eos_id)
        expected += f"prompt: {prompt}\nanswer: {answer}\n\n"
    assert captured.out == expected
    assert "2 prompts" in captured.err


def test_generate_jsonl_and_output_file(reference_npz, capsys, tmp_path):
    import json

    from minimind_jax import cli
    from minimind_jax.data.tokenizer import load_tokenizer

    argv = ["generate", "--ckpt", str(reference_npz), "--tokenizer", str(TOKENIZER_DIR),
            "--n_heads", "4", "--raw", "--temperature", "0", "--max_new_tokens", "6",
            "--prompt", "床前明月光", "--prompt", "白日依山尽，黄河入海流"]
    assert cli.main(argv) == 0
    text_answers = [line[len("answer: "):] for line in capsys.readouterr().out.splitlines()
                    if line.startswith("answer: ")]
    output = tmp_path / "answers.jsonl"
    assert cli.main([*argv, "--jsonl", "--output", str(output)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [json.loads(line) for line in output.read_text().splitlines()]
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    for record, prompt, answer in zip(printed, ["床前明月光", "白日依山尽，黄河入海流"],
                                      text_answers, strict=True):
        assert (record["prompt"], record["answer"]) == (prompt, answer)
        assert record["prompt_tokens"] == 1 + len(tokenizer.encode(prompt))  # <s> + text
        assert 1 <= record["new_tokens"] <= 6 and record["batch_size"] == 2
        assert record["stopped"] in ("eos", "max_new_tokens") and record["batch_seconds"] > 0


def test_chat_streams_the_answer_it_returns(reference_npz, capsys, monkeypatch):
    from minimind_jax import cli
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.model import weights

    questions = iter(["你好"])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code = cli.main(["chat", "--ckpt", str(reference_npz), "--tokenizer", str(TOKENIZER_DIR),
                     "--n_heads", "4", "--temperature", "0", "--max_new_tokens", "10"])
    out = capsys.readouterr().out
    assert code == 0
    answer = out.split("model: ", 1)[1].split("\nyou: ")[0]
    # The same prompt through the batch API gives the streamed text.
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    sd = weights.load_state_dict(reference_npz)
    config = weights.infer_config(sd, ModelConfig(n_heads=4))
    params = weights.params_from_state_dict(sd, config)
    ids = gen.encode_prompt(tokenizer, "你好", template=True)
    new = gen.generate_tokens(params, config, [ids], gen.SamplingConfig(0.0, max_new_tokens=10),
                              tokenizer.eos_id)[0]
    assert answer == tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    assert len(new) > 0


def test_reply_text_leaves_special_tokens_out_as_the_references_decode_it():
    """Both references decode replies with skip_special_tokens=True: a stray <|im_start|> in
    the generated ids is not shown, by `generate`/`chat` (whole and streamed) nor by `serve`."""
    import io

    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.serve.choices import IncrementalDecoder

    tokenizer = load_tokenizer(TOKENIZER_DIR)
    words = tokenizer.encode("你好")
    new = [*words, tokenizer.bos_id, *tokenizer.encode("世界"), tokenizer.eos_id]
    assert gen.answer_text(tokenizer, new) == "你好世界"
    out = io.StringIO()
    streamer = gen.TextStreamer(tokenizer, out=out)
    for token in new:
        streamer(np.asarray([token]), np.asarray([False]))
    assert out.getvalue() == "你好世界"
    decoder = IncrementalDecoder(tokenizer)
    for token in new[:-1]:  # the server stops at the end-of-sequence token
        decoder.push(token)
    assert decoder.text() == "你好世界"
