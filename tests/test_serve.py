"""`serve`: a live server on 127.0.0.1 driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import pytest

from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.infer.sampling import SamplingConfig
from minimind_jax.serve.engine import BatchEngine, Completion, EngineConfig
from tests.helpers import TINY_SHAPE_FLAGS, TOKENIZER_DIR, subprocess_env, wait_until
from tests.serve_fixtures import API_KEY, TINY, expected_answer, live_server, tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

QUESTIONS = ["你好", "介绍一下你自己", "1+1等于几？", "What is JAX?", "写一首关于春天的诗",
             "北京在哪里", "推荐一本书", "今天天气怎么样"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def params():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def server(params):
    with live_server(params) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def expected(params, tokenizer):
    return {q: expected_answer(params, tokenizer, q, MAX_TOKENS) for q in QUESTIONS}


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(url: str, question: str, stream: bool, **extra) -> tuple[str, str, int]:
    """(answer, finish_reason, completion_tokens) from the openai client."""
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": question}],
                  temperature=0, max_tokens=MAX_TOKENS, **extra)
    if not stream:
        reply = client(url).chat.completions.create(**kwargs)
        return (reply.choices[0].message.content, reply.choices[0].finish_reason,
                reply.usage.completion_tokens)
    pieces, finish, usage = [], None, None
    for chunk in client(url).chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece: not streamed"
    return "".join(pieces), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_client_answer_equals_generate(server, expected, stream):
    url, _ = server
    answer, finish, n_tokens = ask(url, QUESTIONS[0], stream)
    assert (answer, finish) == expected[QUESTIONS[0]]
    # usage counts the generated tokens, EOS included (as `generate` returns them)
    assert n_tokens == MAX_TOKENS if finish == "length" else n_tokens <= MAX_TOKENS
    assert len({a for a, _ in expected.values()}) == len(QUESTIONS)  # answers differ


def test_a_request_s_repetition_penalty_is_honoured(server, params, tokenizer, expected):
    """`repetition_penalty` in the body (vLLM's field) is the request's own: at 1.3 the
    answer is `generate`'s with 1.3, which differs from the one at the server's 1.0."""
    url, _ = server
    question = QUESTIONS[2]
    penalised = expected_answer(params, tokenizer, question, MAX_TOKENS, repetition_penalty=1.3)
    assert penalised != expected[question]
    got = ask(url, question, stream=False, extra_body={"repetition_penalty": 1.3})
    assert got[:2] == penalised


def test_eight_concurrent_clients_are_batched_and_get_their_own_answers(server, expected):
    url, engine = server
    steps_before, tokens_before = engine.steps_run, engine.tokens_generated
    barrier = threading.Barrier(len(QUESTIONS), timeout=60)

    def one(i):
        barrier.wait()
        return ask(url, QUESTIONS[i], stream=bool(i % 2))

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(one, range(len(QUESTIONS))))
    for question, (answer, finish, _) in zip(QUESTIONS, answers, strict=True):
        assert (answer, finish) == expected[question], question
    # these 8 decoded together, not one by one: each prompt's first token comes from its
    # prefill, every other from a decode step, which carried one row each if one by one
    decoded = engine.tokens_generated - tokens_before - len(QUESTIONS)
    steps = engine.steps_run - steps_before
    assert decoded >= 2 * steps, f"{decoded} tokens in {steps} decode steps"


def greedy_tokens(params, tokenizer, question: str) -> list[int]:
    """`generate`'s greedy new tokens for one user message, EOS included."""
    from minimind_jax.infer import generate as gen

    ids = gen.encode_prompt(tokenizer, question, template=True)
    return gen.generate_tokens(params, TINY, [ids], SamplingConfig(0.0, max_new_tokens=MAX_TOKENS),
                               tokenizer.eos_id)[0]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_stop_sequence_cuts_the_answer_where_it_begins(server, params, tokenizer, stream):
    url, _ = server
    new = greedy_tokens(params, tokenizer, QUESTIONS[4])
    words = [t for t in new if t != tokenizer.eos_id]
    full = tokenizer.decode(words)
    stop = full[12:15]
    # the tokens generated until the text (at a whole character) first held the stop sequence
    texts = [tokenizer.decode(words[:k]) for k in range(len(words) + 1)]
    used = next(k for k, text in enumerate(texts) if stop in text and text[-1] != "\ufffd")
    got = ask(url, QUESTIONS[4], stream, stop=[stop, "never in the answer"])
    assert got == (full[:full.index(stop)], "stop", used)
    assert ask(url, QUESTIONS[4], stream, stop="never in the answer")[1] == \
        ("stop" if new[-1] == tokenizer.eos_id else "length")


def test_n_choices_each_decode_and_count(server, params, tokenizer, expected):
    url, _ = server
    question = QUESTIONS[5]
    reply = client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=MAX_TOKENS, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all((c.message.content, c.finish_reason) == expected[question]
               for c in reply.choices)
    n_tokens = len(greedy_tokens(params, tokenizer, question))
    assert (reply.usage.completion_tokens, reply.usage.prompt_tokens) == (
        3 * n_tokens, len(tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True))))

    kwargs = dict(model="tiny", messages=[{"role": "user", "content": question}],
                  temperature=1.0, max_tokens=MAX_TOKENS, n=2, seed=11)
    first = [c.message.content for c in client(url).chat.completions.create(**kwargs).choices]
    again = [c.message.content for c in client(url).chat.completions.create(**kwargs).choices]
    streamed = ["", ""]
    for chunk in client(url).chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert first == again == streamed and first[0] != first[1]


def _post(url: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **headers})


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
BAD_REQUESTS = [  # (name, body, headers, status)
    ("no API key", GOOD, {"Authorization": ""}, 401),
    ("wrong API key", GOOD, {"Authorization": "Bearer nope"}, 401),
    ("malformed JSON", b'{"messages": [', None, 400),
    ("not an object", b'[1, 2]', None, 422),
    ("messages missing", {"model": "tiny"}, None, 422),
    ("messages empty", {**GOOD, "messages": []}, None, 422),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, None, 422),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, None, 422),
    ("temperature a string", {**GOOD, "temperature": "hot"}, None, 422),
    ("temperature negative", {**GOOD, "temperature": -1}, None, 422),
    ("repetition_penalty zero", {**GOOD, "repetition_penalty": 0}, None, 422),
    ("max_tokens a float", {**GOOD, "max_tokens": 2.5}, None, 422),
    ("stream a string", {**GOOD, "stream": "yes"}, None, 422),
    ("max_tokens above the cap", {**GOOD, "max_tokens": 10_000}, None, 400),
    ("prompt longer than the context",
     {**GOOD, "messages": [{"role": "user", "content": "你好" * 400}]}, None, 400),
    ("prompt + max_tokens over the context",
     {**GOOD, "max_tokens": 48, "messages": [{"role": "user", "content": "你好" * 120}]}, None,
     400),
    ("n above the cap", {**GOOD, "n": 9}, None, 400),
    ("n zero", {**GOOD, "n": 0}, None, 422),
    ("five stop sequences", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, None, 400),
    ("an empty stop sequence", {**GOOD, "stop": [""]}, None, 400),
    ("tools with a template without tools", {**GOOD, "tools": [{"type": "function"}]}, None,
     400),
    ("a tool message with a template without tools",
     {**GOOD, "messages": [{"role": "tool", "content": "{}"}]}, None, 400),
    ("thinking with a template without a think switch",
     {**GOOD, "chat_template_kwargs": {"enable_thinking": True}}, None, 400),
    ("image content", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, None, 400),
    ("body over 1 MiB", b"x" * ((1 << 20) + 1), None, 413),
]


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, expected):
    url, _ = server
    got = {}
    for name, body, headers, _ in BAD_REQUESTS:
        response = _post(url, body, headers)
        got[name] = response.status_code
        error = response.json().get("error", {})
        assert error.get("message") and error.get("type"), (name, response.text)
    got["GET /nowhere"] = httpx.get(url + "/nowhere",
                                    headers={"Authorization": f"Bearer {API_KEY}"}).status_code
    got["GET /health without key"] = httpx.get(url + "/health").status_code
    print("\n" + "\n".join(f"  {status}  {name}" for name, status in got.items()))
    assert got == {**{name: status for name, _, _, status in BAD_REQUESTS},
                   "GET /nowhere": 404, "GET /health without key": 401}
    page = httpx.get(url + "/")
    assert page.headers["www-authenticate"].startswith("Basic")  # browsers prompt for the key
    assert httpx.get(url + "/", auth=("anyone", API_KEY)).text.startswith("<!doctype html>")
    health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ask(url, QUESTIONS[1], stream=False)[:2] == expected[QUESTIONS[1]]
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_a_full_queue_answers_429_and_recovers(server, expected):
    async def flood(url, n):
        async with httpx.AsyncClient(timeout=120) as http:
            body = {**GOOD, "max_tokens": 48}
            responses = await asyncio.gather(*[
                http.post(url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}) for _ in range(n)])
        return [r.status_code for r in responses]

    url, engine = server  # at most max_batch (8) decoding + max_queue (8) waiting
    statuses = asyncio.run(flood(url, 40))
    assert set(statuses) == {200, 429} and statuses.count(200) >= 8, statuses
    assert engine.queued == 0
    assert ask(url, QUESTIONS[2], stream=True)[:2] == expected[QUESTIONS[2]]


def test_a_cancelled_completion_stops_its_row_and_ends_the_loop(params, tokenizer):
    """What a client hanging up does (the routes call `cancel`): no more tokens for it, and a
    batch with nobody left stops decoding instead of running to max_tokens."""
    engine = BatchEngine(params, TINY, eos_id=-1, pad_id=tokenizer.pad_id,
                         config=EngineConfig(max_batch=2, batch_wait_s=0.0))
    try:
        events, done = [], threading.Event()

        def on_event(event):
            events.append(event)
            if len(events) == 3:
                completion.cancel()
            if event[0] != "token":
                done.set()

        completion = Completion([1, 5, 6, 7], SamplingConfig(temperature=0, max_new_tokens=40),
                                on_event)
        engine.submit(completion)
        assert done.wait(120)
        assert [e[0] for e in events] == ["token"] * 3 + ["end"]
        assert completion.generated == 3  # the row stopped at once, 37 steps were not run
    finally:
        engine.stop()


@pytest.mark.slow
def test_the_serve_command_answers_over_http(params, expected, tmp_path):
    """`minimind-jax serve` as a user starts it: weights file + tokenizer flags, then the API."""
    import socket
    import subprocess
    import sys

    from minimind_jax.model import weights

    weights_file = tmp_path / "tiny.npz"
    weights.save_state_dict(weights.state_dict_from_params(params, TINY), weights_file)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "minimind_jax.cli", "serve", "--ckpt", str(weights_file),
            "--tokenizer", str(TOKENIZER_DIR), *TINY_SHAPE_FLAGS, "--port", str(port),
            "--api_key", API_KEY, "--log_level", "warning", "--max_batch", "2",
            "--max_context", "192"]  # a small warm-up: 2 decode steps, 4 + 3 prefills
    server = subprocess.Popen(argv, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert server.poll() is None, server.stderr.read()
            try:
                return httpx.get(url + "/health", timeout=2,
                                 headers={"Authorization": f"Bearer {API_KEY}"}
                                 ).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 300, "the server's /health", poll_s=0.2)
        assert ask(url, QUESTIONS[3], stream=False)[:2] == expected[QUESTIONS[3]]
        assert httpx.get(url + "/").status_code == 401  # the page wants the key too
        wait_until(lambda: not httpx.get(  # the warm-up goes on behind the serving
            url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()["warming"],
            300, "the end of the warm-up", poll_s=0.2)
    finally:
        server.terminate()
        server.wait(30)
    assert "warm-up: 9 programs compiled or loaded in" in server.stderr.read()


def test_bad_serve_flags_are_one_error_line(capsys):
    from minimind_jax import cli

    code = cli.main(["serve", "--ckpt", str(TOKENIZER_DIR), "--max_tokens", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --max_tokens must be >= 1, got 0; --default_max_tokens must be in "
        "[1, --max_tokens], got 256")
    code = cli.main(["serve", "--ckpt", str(TOKENIZER_DIR), "--prefill_chunk", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --prefill_chunk must be >= 1, got 0"


def test_health_says_warming_while_the_warm_up_runs_then_done(params, tokenizer):
    """/health while the background warm-up runs (held after its first program), a chat
    answered meanwhile as `generate` answers it, then /health once it is done. Shapes (2 slots
    of 176 positions) are this test's own."""
    question = QUESTIONS[0]
    with live_server(params, max_batch=2, max_context=176) as (url, engine):
        gate, finished = threading.Event(), threading.Event()
        engine.start_warm_up(lambda done, total: gate.wait(300), then=lambda _: finished.set())
        try:
            health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
            body = health.json()
            assert body["warming"] is True and body["programs_warm"] <= 1, body
            # decode steps of 1 and 2 rows over 176 positions; prefills of one prompt of 32,
            # 64, 128 or 176 tokens and of two of up to 128 (256 padded tokens)
            assert body["programs_total"] == 2 + 4 + 3
            assert ask(url, question, stream=False)[:2] == expected_answer(
                params, tokenizer, question, MAX_TOKENS)
        finally:
            gate.set()
        assert finished.wait(300)
        body = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert (body["warming"], body["programs_warm"], body["programs_total"]) == (False, 9, 9)
