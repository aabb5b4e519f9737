"""A live `serve` app on 127.0.0.1 (random free port) around a tiny model, and a headless
Chromium that uses its chat page: for the tests and docs/serve_screenshot.py."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time

import jax

from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.infer import generate as gen
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import init_params
from tests.helpers import TINY_CONFIG, TOKENIZER_DIR

TINY = TINY_CONFIG.replace(max_seq_len=128)
API_KEY = "sk-test-key"


def tiny_model(seed: int = 0, scale: float = 4.0, config: ModelConfig = TINY):
    """Random params with sharpened linear kernels, so greedy answers vary with the prompt."""
    params = init_params(config, seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if "embeddings" not in jax.tree_util.keystr(path) else x,
        params)


def expected_answer(params, tokenizer, text: str, max_tokens: int,
                    repetition_penalty: float = 1.0) -> tuple[str, str]:
    """What `generate` answers greedily to one user message: (text, finish_reason)."""
    ids = gen.encode_prompt(tokenizer, text, template=True)
    sampling = gen.SamplingConfig(temperature=0.0, max_new_tokens=max_tokens,
                                  repetition_penalty=repetition_penalty)
    new = gen.generate_tokens(params, TINY, [ids], sampling, tokenizer.eos_id)[0]
    reason = "stop" if new and new[-1] == tokenizer.eos_id else "length"
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id]), reason


@contextlib.contextmanager
def live_server(params, *, api_key: str | None = API_KEY, max_batch: int = 8,
                max_queue: int = 8, max_tokens_cap: int = 48, max_context: int = 192,
                config: ModelConfig = TINY, tokenizer_dir=TOKENIZER_DIR):
    """Yields (base_url, engine); the server runs in a thread of this process."""
    from minimind_jax.serve.app import ServeSettings, build_app
    from minimind_jax.serve.command import running_server
    from minimind_jax.serve.engine import BatchEngine, EngineConfig

    tokenizer = load_tokenizer(tokenizer_dir)
    engine = BatchEngine(params, config, tokenizer.eos_id, tokenizer.pad_id,
                         EngineConfig(max_batch=max_batch, max_queue=max_queue,
                                      max_context=max_context, batch_wait_s=0.05))
    settings = ServeSettings(model_name="tiny", api_key=api_key, max_tokens_cap=max_tokens_cap,
                             default_max_tokens=16, max_context=max_context)
    try:
        with running_server(build_app(engine, tokenizer, settings)) as url:
            yield url, engine
    finally:
        engine.stop()


@contextlib.contextmanager
def headless_chromium(binary: str, driver_path: str, size: str = "1100,720"):
    """A selenium driver for Debian's chromium (root-safe flags, a throwaway profile)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="minimind-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--window-size={size}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def send_and_wait(driver, text: str, n_answers: int, timeout: float = 120) -> dict:
    """Type `text` into the chat page, send it, wait for answer number `n_answers` to end;
    returns its {state, chunks, text, stats}."""
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()
    deadline, states = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        answers = driver.execute_script(
            "return [...document.querySelectorAll('.msg.assistant')].map(m => ({state: "
            "m.dataset.state, chunks: Number(m.dataset.chunks), "
            "text: m.querySelector('.text').textContent, "
            "stats: m.querySelector('.stats').textContent}))")
        if len(answers) == n_answers:
            states.append(answers[-1]["state"])
            if answers[-1]["state"] != "streaming":
                return answers[-1]
        time.sleep(0.05)
    raise AssertionError(f"no answer within {timeout}s (states seen: {set(states)})")
