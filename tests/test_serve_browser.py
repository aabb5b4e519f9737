"""The chat page in a real headless Chromium: it streams the answer and keeps the conversation.

Needs Debian's `chromium` + `chromium-driver` (CI installs them) and selenium; skipped without.
`MINIMIND_SERVE_SCREENSHOT=docs/serve.png` also saves a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil

import pytest

from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.infer import generate as gen
from tests.helpers import TOKENIZER_DIR
from tests.serve_fixtures import TINY, headless_chromium, live_server, send_and_wait, tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium + chromedriver installed")
MAX_TOKENS = 24


@pytest.fixture
def browser():
    with headless_chromium(CHROMIUM, CHROMEDRIVER) as driver:
        yield driver


def greedy_reply(params, tokenizer, history: list[dict], question: str) -> str:
    ids = gen.encode_prompt(tokenizer, question, True, history=history)
    sampling = gen.SamplingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS)
    new = gen.generate_tokens(params, TINY, [ids], sampling, tokenizer.eos_id)[0]
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id])


def test_chat_page_streams_answers_and_keeps_the_conversation(browser):
    params = tiny_model()
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    with live_server(params, api_key=None) as (url, _):
        browser.get(url + "/")
        assert browser.title == "MiniMind chat"
        browser.execute_script(
            "for (const [id, v] of [['temperature', '0'], ['max_tokens', arguments[0]]]) {"
            "  const e = document.getElementById(id); e.value = v;"
            "  e.dispatchEvent(new Event('input')); }", str(MAX_TOKENS))
        first = send_and_wait(browser, "你好", 1)
        assert first["state"] == "done", first
        expected = greedy_reply(params, tokenizer, [], "你好")
        assert first["text"] == expected
        assert first["chunks"] > 1  # arrived in pieces, as they were decoded
        assert "finish: " in first["stats"]
        second = send_and_wait(browser, "介绍一下你自己", 2)
        history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": expected}]
        assert second["text"] == greedy_reply(params, tokenizer, history, "介绍一下你自己")
        assert "tiny" in browser.find_element("id", "model").text
        if os.environ.get("MINIMIND_SERVE_SCREENSHOT"):
            browser.save_screenshot(os.environ["MINIMIND_SERVE_SCREENSHOT"])
