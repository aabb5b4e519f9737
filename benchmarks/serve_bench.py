"""Streaming chat throughput and latency: the reference's server against ours, one CPU, one run.

    python benchmarks/serve_bench.py --reference_python /path/to/venv/bin/python

Two OpenAI-style servers of the same weights, driven in turn by the same client code:

* the reference: MiniMind2's own `scripts/serve_openai_api.py` (jingyaogong/minimind at
  `--reference_commit`, d9453ed by default), unmodified, run by `--reference_python` (it needs
  torch, a transformers that runs d9453ed's model code (4.x), fastapi and uvicorn) in a
  subprocess from a temporary copy of the checkout: `git archive` of `--reference_repo`, or a
  copy of `--reference PATH` (without its .git/out/images/dataset; the bench never writes into
  PATH). Our exported weights go to the copy's `out/full_sft_<dim>.pth` and our tokenizer
  (tests/fixtures/minimind_tokenizer, the same files as the reference's) replaces its
  `model/minimind_tokenizer`. The script binds 0.0.0.0:8998 itself (the bench stops if that
  port is taken), decodes fp32 on the CPU, and is stopped at the end, on errors and on Ctrl-C;
  its output goes to a log file whose path is printed;
* ours: `minimind_jax.serve` (BatchEngine + build_app) in this process, uvicorn in a thread.

Clients are plain threads streaming with httpx, in a child process of their own (ours runs in
the bench's process, where their Python work would contend with it for the interpreter lock),
with `stream: true` on both (the reference's non-stream route runs generate inside its async
handler and so serves one request at a time; its stream route runs a sync generator in
Starlette's threadpool). Each level of
`--concurrency` sends the same prompts (`--requests`, or `--reference_requests` to the
reference), first the reference, then ours, never both at once (the loads would share the
cores); each after an untimed warm-up (the reference: one request per client; ours: 1, 2, 4,
... requests at once, up to the level's clients, then rounds of the level until one compiles
nothing new; a timed round of ours that compiled anyway is run again, up to 3 times, and the
table says how many programs its last one compiled). Per server and level: generated tokens/s
and requests/s (both over the timed round's wall time), p50/p95 time to first token (TTFT:
until the first chunk with non-empty content) and per-request latency (until the stream
closes), and the 1-minute load average before/after the timed round, since a shared machine
moves the figures. Then ours / the reference's tokens/s per level.

Then the probes (`--probe_lengths`): does a newcomer's time to first token grow with the length
of what is already running? For each L, `--probe_background` clients keep the server busy with
requests of L generated tokens (each client sends its next as soon as its last ends) while
`--probes` short requests (PROBE_TOKENS tokens) are sent one after another and timed. A server
that batches statically makes a probe wait for the running batch to finish (TTFT grows with L);
one that batches continuously prefills it between two decode steps.

Exact token counts on both sides: the reference streams no `usage`, and its chunks are not one
per token (it skips decodes that are empty or end in an incomplete UTF-8 character). So the
weights (random, `init_params(config, --seed)`) have one edit, stated here because the
figures are honest only with it: coordinate 0 of the tied embedding is +K (`--logit_offset`,
32) in the rows of "clean" tokens (not special, decoding alone to non-empty text without
U+FFFD) and -K in every other row, EOS included. Every residual stream is then dominated by
that coordinate, the final RMS-normalised hidden state points along +coordinate 0 after a clean
token, and the logits of clean tokens share an offset of about K*sqrt(dim) (which softmax
ignores) while the others sit about 2*K*sqrt(dim) below them (over 1000 for minimind2-small:
exp underflows to exactly 0 in float32, and top-p drops them too). Hence no reply can end on
EOS, every reply generates exactly its limit, and every token the reference samples makes
exactly one non-empty chunk, so counting its chunks counts its tokens. The bench checks it:
ours must answer finish_reason "length" with usage.completion_tokens == max_tokens, the
reference must stream exactly the expected number of chunks. The weights cost what any
weights of that shape cost; only the text is gibberish.

The prompt side: the reference keeps only the last `max_tokens` CHARACTERS of the
chat-templated prompt text, and its `max_tokens` bounds prompt + generated tokens (its
`_stream` loop runs while the sequence is shorter than max_tokens - 1). To give both servers
the same work, each reference request asks for the smallest max_tokens M with
M - 1 - (tokens of the last M characters of the templated prompt) = N (`--max_tokens`); for
these short prompts that is P + 1 + N, P the whole prompt's tokens (M exceeds its length in
characters, so nothing is cut): the reference then reads the whole prompt, as ours does, and
generates exactly N tokens. Both servers sample (the reference always does) with
`--temperature` and `--top_p`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from minimind_jax.serve.serve_config import ServeConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENIZER_DIR = REPO / "tests" / "fixtures" / "minimind_tokenizer"
REFERENCE_PORT = 8998  # fixed by the reference's script
REFERENCE_URL = f"http://127.0.0.1:{REFERENCE_PORT}"
DEFAULT_MIRROR = "/work/.mirror/jingyaogong+minimind/repo"
PROBE_TOKENS = 40  # fewer, and the reference would cut the prompt to fit its max_tokens
TOPICS = ["春天", "大海", "月亮", "朋友", "学习", "音乐", "城市", "秋天", "时间", "家乡", "书籍",
          "科学", "旅行", "雨天", "星空", "勇气"]


class BenchError(Exception):
    """A problem worth one line to the user (exit 2)."""


def prompts(n: int) -> list[str]:
    kinds = ["写一句关于{}的话", "介绍一下{}"]
    return [kinds[i % 2].format(TOPICS[i // 2 % len(TOPICS)]) + f"（{i}）" for i in range(n)]


# ------------------------------------------------------------------ weights
def clean_tokens(tokenizer, vocab_size: int) -> np.ndarray:
    """[vocab] bool: not special, and decodes alone to non-empty text without U+FFFD."""
    special = {tokenizer.eos_id, tokenizer.pad_id}
    out = np.zeros(vocab_size, bool)
    for t in range(vocab_size):
        text = tokenizer.decode([t], skip_special_tokens=True)
        out[t] = t not in special and bool(text) and "\ufffd" not in text
    return out


def bench_params(config, tokenizer, seed: int, offset: float):
    """Random params whose embedding coordinate 0 is +offset for clean tokens, else -offset."""
    import jax

    from minimind_jax.model.transformer import init_params

    params = jax.device_get(init_params(config, seed))
    embedding = np.array(params["tok_embeddings"], dtype=np.float32)
    clean = clean_tokens(tokenizer, embedding.shape[0])
    if clean[tokenizer.eos_id]:
        raise BenchError("the EOS token decodes to text; the EOS trick needs it special")
    embedding[:, 0] = np.where(clean, offset, -offset)
    params["tok_embeddings"] = embedding
    return params, clean


# ------------------------------------------------------------------ the reference
def port_taken(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def check_reference_python(python: str) -> None:
    code = "import torch, transformers, fastapi, uvicorn, pydantic"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BenchError(f"--reference_python {python} does not run: {err}") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"--reference_python {python} cannot import what the reference's "
                         f"server needs (torch, transformers, fastapi, uvicorn): {last}")


def reference_checkout(args, into: pathlib.Path) -> str:
    """Fill `into` with the reference's files; returns where they came from."""
    if args.reference:
        source = pathlib.Path(args.reference)
        if not (source / "scripts" / "serve_openai_api.py").is_file():
            raise BenchError(f"--reference {source} holds no scripts/serve_openai_api.py")
        shutil.copytree(source, into, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "out", "images", "dataset",
                                                      "*.pth"))
        return f"a copy of {source}"
    repo = args.reference_repo
    try:
        done = subprocess.run(["git", "-C", repo, "archive", "--format=tar",
                               args.reference_commit], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BenchError(f"git archive of {repo} failed: {err}") from None
    if done.returncode:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise BenchError(f"no reference checkout: `git -C {repo} archive "
                         f"{args.reference_commit}` failed ({last}); pass --reference PATH "
                         "or --reference_repo GIT_DIR")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    if not (into / "scripts" / "serve_openai_api.py").is_file():
        raise BenchError(f"{repo} at {args.reference_commit} has no scripts/serve_openai_api.py")
    return f"{repo} at {args.reference_commit}"


def reference_argv(config) -> list[str]:
    """The reference script's model flags for `config` (MiniMind2 shapes only)."""
    if (config.qk_norm or config.n_heads != 8 or config.n_kv_heads != 2
            or config.vocab_size != 6400 or config.use_moe
            or config.hidden_dim != 64 * -(-int(8 * config.dim / 3) // 64)):  # its LMConfig
        raise BenchError("the reference's server takes MiniMind2 dense shapes only (8 heads, 2 "
                         "KV heads, vocab 6400); use --skip_reference for this preset")
    return ["--dim", str(config.dim), "--n_layers", str(config.n_layers)]


class ReferenceServer:
    """`cd CHECKOUT/scripts && PYTHON serve_openai_api.py ...` in its own session; stopped
    (the whole process group) on exit."""

    def __init__(self, python: str, checkout: pathlib.Path, argv: list[str],
                 log: pathlib.Path):
        self.python, self.checkout, self.argv, self.log = python, checkout, argv, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [self.python, "serve_openai_api.py", *self.argv], cwd=self.checkout / "scripts",
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the reference's server exited ({self.proc.returncode}) "
                                 f"before answering; see {self.log}")
            try:
                httpx.get(REFERENCE_URL + "/docs", timeout=2)
                return REFERENCE_URL
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the reference's server did not answer in 300 s; see "
                                 f"{self.log}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def reference_max_tokens(tokenizer, text: str, n: int) -> tuple[int, int]:
    """(max_tokens to send the reference so that it generates exactly n tokens, the tokens
    of the prompt it then reads). It keeps text[-max_tokens:] and generates while the
    sequence is shorter than max_tokens - 1."""
    ask = n
    while True:
        prompt = len(tokenizer.encode(text[-ask:]))
        generated = max(0, ask - 1 - prompt)
        if generated == n:
            return ask, prompt
        if generated > n or ask > 4 * (len(text) + n + 8):
            raise BenchError(f"no max_tokens makes the reference generate exactly {n} tokens "
                             f"for the prompt {text!r}")
        ask += 1


# ------------------------------------------------------------------ clients
@dataclasses.dataclass
class Reply:
    start: float
    first: float | None = None  # first chunk with non-empty content
    end: float | None = None
    chunks: int = 0  # chunks with non-empty content
    finish: str | None = None
    usage: dict | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return (self.first if self.first is not None else self.end) - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


def stream_one(client, url: str, body: dict) -> Reply:
    """One streamed chat completion, timed; errors are kept in the Reply, not raised."""
    reply = Reply(time.perf_counter())
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                reply.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return reply
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    reply.error = f"server error: {str(event['error'])[:200]}"
                    break
                reply.usage = event.get("usage") or reply.usage
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        if reply.first is None:
                            reply.first = time.perf_counter()
                        reply.chunks += 1
                    reply.finish = choice.get("finish_reason") or reply.finish
    except Exception as err:  # noqa: BLE001 - reported per request
        reply.error = f"{type(err).__name__}: {err}"
    finally:
        reply.end = time.perf_counter()
    return reply


def run_round(url: str, bodies: list[dict], concurrency: int) -> tuple[list[Reply], float]:
    """Send `bodies` from `concurrency` daemon threads (each takes the next waiting one);
    (replies in body order, wall seconds). Interruptible: the main thread only polls."""
    import httpx

    todo: queue.Queue = queue.Queue()
    for item in enumerate(bodies):
        todo.put(item)
    replies: list[Reply | None] = [None] * len(bodies)

    def work() -> None:
        with httpx.Client(timeout=httpx.Timeout(900.0)) as client:
            while True:
                try:
                    index, body = todo.get_nowait()
                except queue.Empty:
                    return
                replies[index] = stream_one(client, url, body)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    wall = time.perf_counter() - start
    failed = [r.error for r in replies if r.error]
    if failed:
        raise BenchError(f"{len(failed)}/{len(bodies)} requests to {url} failed, e.g. "
                         f"{failed[0]}")
    return replies, wall


class ClientProcess:
    """Runs `run_round` and `probe_ttft` in a child process: our server runs in this one, and
    clients in its threads would contend with it for the interpreter lock (the reference's
    server has a process of its own)."""

    def __init__(self):
        import concurrent.futures
        import multiprocessing

        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, fn, *args):
        import concurrent.futures

        future = self._pool.submit(fn, *args)
        while True:  # polled, so that Ctrl-C reaches the main thread
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def summarize(replies: list[Reply], wall: float, tokens: int, load: tuple) -> dict:
    ttft = np.array([r.ttft for r in replies])
    latency = np.array([r.latency for r in replies])
    return {"requests": len(replies), "tokens": tokens, "wall": wall,
            "tokens_s": tokens / wall, "requests_s": len(replies) / wall,
            "ttft50": float(np.percentile(ttft, 50)), "ttft95": float(np.percentile(ttft, 95)),
            "lat50": float(np.percentile(latency, 50)),
            "lat95": float(np.percentile(latency, 95)), "load": load}


def check_ours(replies: list[Reply], n: int) -> None:
    for r in replies:
        got = (r.usage or {}).get("completion_tokens")
        if r.finish != "length" or got != n:
            raise BenchError(f"one of our replies finished {r.finish!r} with "
                             f"completion_tokens={got}, not 'length' with {n}: the EOS trick "
                             "failed (try a larger --logit_offset)")


def check_reference(replies: list[Reply], expected: list[int]) -> None:
    for r, want in zip(replies, expected, strict=True):
        if r.chunks != want:
            raise BenchError(f"a reference stream had {r.chunks} content chunks, not the "
                             f"{want} tokens it must generate: its token count is not exact")


# ------------------------------------------------------------------ ours
def compilations(engine) -> int | None:
    """Programs the engine compiled so far (`engine.compilations`, or the padded generation
    loop's jit cache for the engine that predates it); None when neither exists."""
    count = getattr(engine, "compilations", None)
    if count is not None:
        return int(count)
    from minimind_jax.infer import generate

    cached = getattr(getattr(generate, "_generate_padded", None), "_cache_size", None)
    return cached() if cached else None


def without_compiling(engine, what: str, measure, *args):
    """(measure(*args), programs `engine` compiled while it ran): run again, up to 3 times in
    all, while it compiled. engine None (the reference), or one that cannot count: run once,
    None."""
    for attempt in range(1, 4):
        before = None if engine is None else compilations(engine)
        result = measure(*args)
        compiled = None if before is None else compilations(engine) - before
        if not compiled:
            break
        print(f"       {what}: timed pass {attempt} compiled {compiled} program(s); running "
              "it again", flush=True)
    return result, compiled


def warm_ours(clients: ClientProcess, url: str, engine, bodies: list[dict], concurrency: int,
              rounds: int = 5) -> int:
    """Untimed: 1, 2, 4, ... requests sent together (up to `concurrency`: the batch sizes a
    level can form), then rounds of the level until one compiles nothing new; the rounds run."""
    size = 1
    while size < concurrency:
        clients(run_round, url, bodies[:size], size)
        size *= 2
    for done in range(1, rounds + 1):
        before = compilations(engine)
        clients(run_round, url, bodies, concurrency)
        if before is None or compilations(engine) == before:
            return done
    return rounds


def probe_ttft(url: str, background: dict, probe: dict, n_background: int,
               n_probes: int) -> list[float]:
    """Time to first token of `n_probes` short requests sent one after another while
    `n_background` clients keep the server busy with `background` requests (each client sends
    a new one as soon as its last ends, so the running batch always holds requests of that
    length)."""
    import httpx

    stop = threading.Event()
    errors: list[str] = []

    def keep_busy() -> None:
        with httpx.Client(timeout=httpx.Timeout(900.0)) as client:
            while not stop.is_set():
                reply = stream_one(client, url, background)
                if reply.error:
                    errors.append(reply.error)
                    return

    threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(n_background)]
    for thread in threads:
        thread.start()
    ttfts = []
    try:
        time.sleep(0.5)  # the background requests are decoding
        with httpx.Client(timeout=httpx.Timeout(900.0)) as client:
            for _ in range(n_probes):
                reply = stream_one(client, url, probe)
                if reply.error:
                    raise BenchError(f"a probe request to {url} failed: {reply.error}")
                ttfts.append(reply.ttft)
                time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    if errors:
        raise BenchError(f"a background request to {url} failed: {errors[0]}")
    return ttfts


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    from minimind_jax.infer.infer_config import field_flag
    from minimind_jax.serve.serve_config import EngineConfig, ServeSettings

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small",
                        help="model preset (default %(default)s = the reference's --dim 512 "
                             "--n_layers 8)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="client threads per level (default %(default)s)")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per level (default %(default)s)")
    parser.add_argument("--reference_requests", type=int, default=None,
                        help="requests per level sent to the reference (default: --requests; "
                             "the first ones of the same prompts)")
    parser.add_argument("--max_tokens", type=int, default=64,
                        help="tokens every reply generates (default %(default)s)")
    field_flag(parser, ServeSettings, "temperature",
               "sampling temperature, both servers (default %(default)s, serve's)")
    field_flag(parser, ServeSettings, "top_p",
               "nucleus sampling, both servers (default %(default)s, serve's)")
    field_flag(parser, EngineConfig, "max_batch",
               "ours: completions decoded together (default %(default)s)", default=32)
    parser.add_argument("--dtype", default="float32",
                        help="ours: compute dtype (default %(default)s; the reference runs "
                             "float32)")
    parser.add_argument("--probe_lengths", type=int, nargs="*", default=[64, 256],
                        help="TTFT against the running batch's length: for each L, probe "
                             "requests are timed while --probe_background clients keep "
                             "requests of L tokens decoding (default %(default)s; none: skip)")
    parser.add_argument("--probe_background", type=int, default=7,
                        help="clients keeping the batch busy while probing (default "
                             "%(default)s)")
    parser.add_argument("--probes", type=int, default=8,
                        help="probe requests per length, one after another (default "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="init seed of the random weights")
    parser.add_argument("--logit_offset", type=float, default=32.0,
                        help="K of the EOS trick (see above; default %(default)s)")
    parser.add_argument("--reference", default=None, metavar="PATH",
                        help="a checkout of the reference (copied to a temp folder; default: "
                             "git archive of --reference_repo at --reference_commit)")
    parser.add_argument("--reference_repo", default=DEFAULT_MIRROR, metavar="GIT_DIR",
                        help="git repository of jingyaogong/minimind (default %(default)s)")
    parser.add_argument("--reference_commit", default="d9453ed",
                        help="the reference's commit (default %(default)s)")
    parser.add_argument("--reference_python", default=sys.executable, metavar="PYTHON",
                        help="interpreter for the reference's server (default: this one); it "
                             "needs torch, transformers 4.x, fastapi, uvicorn")
    parser.add_argument("--reference_log", default=None, metavar="FILE",
                        help="the reference's stdout/stderr (default: a new temp file)")
    parser.add_argument("--skip_reference", action="store_true",
                        help="measure ours only (the reference's port is fixed at 8998 by its "
                             "script)")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --requests and --max_tokens must be >= 1")
    if args.reference_requests is not None and args.reference_requests < 1:
        parser.error("--reference_requests must be >= 1")
    if args.logit_offset <= 0:
        parser.error("--logit_offset must be > 0")
    return args


def bodies_for(questions: list[str], max_tokens: list[int], args) -> list[dict]:
    return [{"model": "minimind", "messages": [{"role": "user", "content": q}],
             "max_tokens": m, "temperature": args.temperature, "top_p": args.top_p,
             "stream": True, "stream_options": {"include_usage": True}}
            for q, m in zip(questions, max_tokens, strict=True)]


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | requests | generated tokens | tokens/s | requests/s | "
             "TTFT p50 | TTFT p95 | latency p50 | latency p95 | load avg 1 min before/after | "
             "compiled while timed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens']} "
                     f"| {r['tokens_s']:.1f} | {r['requests_s']:.2f} | {r['ttft50']:.3f} s | "
                     f"{r['ttft95']:.3f} s | {r['lat50']:.2f} s | {r['lat95']:.2f} s | "
                     f"{r['load'][0]:.2f} / {r['load'][1]:.2f} | {r.get('compiled', '-')} |")
    return "\n".join(lines)


def run(args) -> None:
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.model.config import preset
    from minimind_jax.model.transformer import count_params

    config = preset(args.preset).replace(dtype=args.dtype)
    with_reference = not args.skip_reference
    if with_reference:
        ref_argv = reference_argv(config)
        if port_taken(REFERENCE_PORT):
            raise BenchError(f"port {REFERENCE_PORT} (fixed by the reference's script) is in "
                             "use; stop what listens there, or pass --skip_reference")
        check_reference_python(args.reference_python)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    params, clean = bench_params(config, tokenizer, args.seed, args.logit_offset)

    n = args.max_tokens
    questions = prompts(args.requests)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True) for q in questions]
    prompt_ids = [tokenizer.encode(t) for t in texts]
    if not all(clean[ids[-1]] for ids in prompt_ids):
        raise BenchError("a templated prompt ends on a non-clean token; the EOS trick needs a "
                         "clean one")
    longest = max(map(len, prompt_ids))
    ours = our_config(args, longest + n + 1)
    print(f"{args.preset}: {count_params(params):,} params, ours {config.dtype}, "
          f"{os.cpu_count()} CPUs, {n} generated tokens per request (prompts "
          f"{min(map(len, prompt_ids))}-{longest} tokens), temperature {args.temperature}, "
          f"top_p {args.top_p}, our max_batch {args.max_batch}", flush=True)

    ref_questions = questions[:args.reference_requests or args.requests]
    ref_asks = [reference_max_tokens(tokenizer, t, n) for t in texts[:len(ref_questions)]]
    ref_bodies = bodies_for(ref_questions, [a for a, _ in ref_asks], args)
    our_bodies = bodies_for(questions, [n] * len(questions), args)

    with contextlib.ExitStack() as stack:
        clients = ClientProcess()
        stack.callback(clients.close)
        ref_url = None
        if with_reference:
            ref_url = start_reference(args, config, params, ref_argv, stack)
        engine, our_url = start_ours(ours, config, params, tokenizer, stack)
        rows, ours_ok, ref_ok = [], 0, 0
        for concurrency in args.concurrency:
            if ref_url:
                clients(run_round, ref_url, ref_bodies[:concurrency], concurrency)  # warm-up
                load = os.getloadavg()[0]
                replies, wall = clients(run_round, ref_url, ref_bodies, concurrency)
                check_reference(replies, [n] * len(replies))
                ref_ok += len(replies)
                rows.append({"server": "reference", "concurrency": concurrency,
                             **summarize(replies, wall, sum(r.chunks for r in replies),
                                         (load, os.getloadavg()[0]))})
                report(rows[-1])
            warm = warm_ours(clients, our_url, engine, our_bodies, concurrency)
            def timed_round(concurrency):
                load = os.getloadavg()[0]
                replies, wall = clients(run_round, our_url, our_bodies, concurrency)
                check_ours(replies, n)
                return load, replies, wall

            (load, replies, wall), compiled = without_compiling(
                engine, f"ours @ {concurrency:>2} clients", timed_round, concurrency)
            ours_ok += len(replies)
            rows.append({"server": "ours", "concurrency": concurrency,
                         **summarize(replies, wall,
                                     sum(r.usage["completion_tokens"] for r in replies),
                                     (load, os.getloadavg()[0]))})
            rows[-1]["compiled"] = "?" if compiled is None else compiled
            report(rows[-1], f", {warm} warm-up round(s) of the level, "
                             f"{rows[-1]['compiled']} compilations while timed")

        probes = run_probes(clients, args, tokenizer, texts, questions, ref_url, our_url,
                            engine)

    print(f"\nEOS unreachable: verified on ours ({ours_ok}/{ours_ok} replies ran to max_tokens "
          f"with finish_reason 'length')" + (
              f" and on the reference ({ref_ok}/{ref_ok} streams had exactly {n} non-empty "
              "chunks = tokens)" if with_reference else ""))
    print("\n" + table(rows))
    if with_reference:
        print("\n| clients | ours tokens/s | reference tokens/s | ours / reference |\n"
              "|---|---|---|---|")
        by = {(r["server"], r["concurrency"]): r for r in rows}
        for c in args.concurrency:
            ours, ref = by["ours", c]["tokens_s"], by["reference", c]["tokens_s"]
            print(f"| {c} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x |")
    if probes:
        print(f"\nTime to first token of {args.probes} probe requests ({PROBE_TOKENS} tokens each)"
              f" sent one after another while {args.probe_background} clients keep requests of "
              "L tokens decoding:\n\n| server | L | probe TTFT p50 | probe TTFT p95 | max "
              "| compiled while timed |\n|---|---|---|---|---|---|")
        for server, length, ttfts, compiled in probes:
            print(f"| {server} | {length} | {np.percentile(ttfts, 50):.3f} s | "
                  f"{np.percentile(ttfts, 95):.3f} s | {max(ttfts):.3f} s "
                  f"| {'-' if compiled is None else compiled} |")



def run_probes(clients: ClientProcess, args, tokenizer, texts, questions, ref_url,
               our_url, engine) -> list[tuple]:
    """[(server, L, probe TTFTs, programs compiled while timed)] for each --probe_lengths L
    (ours after one untimed pass, and run again, up to 3 times, when it compiled anyway)."""
    out = []
    for length in args.probe_lengths:
        for server, url in (("reference", ref_url), ("ours", our_url)):
            if url is None:
                continue
            if server == "reference":
                asks = [reference_max_tokens(tokenizer, texts[i], m)[0]
                        for i, m in ((0, length), (1, PROBE_TOKENS))]
            else:
                asks = [length, PROBE_TOKENS]
            background, probe = bodies_for(questions[:2], asks, args)
            if server == "ours":  # compile the buckets these shapes need
                clients(probe_ttft, url, background, probe, args.probe_background, 2)
            ttfts, compiled = without_compiling(
                engine if server == "ours" else None, f"ours probes with L={length}",
                clients, probe_ttft, url, background, probe, args.probe_background,
                args.probes)
            out.append((server, length, ttfts, compiled))
            print(f"  {server:>9} probes with L={length}: TTFT p50/p95 "
                  f"{np.percentile(ttfts, 50):.3f}/{np.percentile(ttfts, 95):.3f} s"
                  + ("" if compiled is None else f", {compiled} compilations while timed"),
                  flush=True)
    return out


def report(row: dict, extra: str = "") -> None:
    print(f"  {row['server']:>9} @ {row['concurrency']:>2} clients: {row['tokens_s']:.1f} "
          f"tokens/s, {row['requests_s']:.2f} req/s, TTFT p50/p95 {row['ttft50']:.3f}/"
          f"{row['ttft95']:.3f} s, latency p50/p95 {row['lat50']:.2f}/{row['lat95']:.2f} s"
          f"{extra}", flush=True)


def start_reference(args, config, params, argv: list[str], stack: contextlib.ExitStack) -> str:
    """A temp checkout with our weights and tokenizer, its server started (stopped by
    `stack`); the base URL."""
    from minimind_jax.model.weights import save_state_dict, state_dict_from_params

    checkout = pathlib.Path(stack.enter_context(
        tempfile.TemporaryDirectory(prefix="serve_bench_reference_")))
    source = reference_checkout(args, checkout)
    save_state_dict(state_dict_from_params(params, config),
                    checkout / "out" / f"full_sft_{config.dim}.pth")
    shutil.rmtree(checkout / "model" / "minimind_tokenizer", ignore_errors=True)
    shutil.copytree(TOKENIZER_DIR, checkout / "model" / "minimind_tokenizer")
    if args.reference_log:
        log = pathlib.Path(args.reference_log)
    else:
        fd, name = tempfile.mkstemp(prefix="serve_bench_reference_", suffix=".log")
        os.close(fd)
        log = pathlib.Path(name)
    print(f"reference: {source}, served by {args.reference_python} "
          f"(log: {log})", flush=True)
    return stack.enter_context(ReferenceServer(args.reference_python, checkout, argv, log))


def our_config(args, context: int) -> ServeConfig:
    """Our server's config (its bounds checked): `serve`'s defaults but for the model's name,
    --max_batch, a queue that holds a level's requests, a context of at least `context`
    tokens, a max_tokens cap that admits --max_tokens, and the sampling of both servers."""
    from minimind_jax.infer.infer_config import field_default
    from minimind_jax.serve.serve_config import EngineConfig, ServeConfig, ServeSettings

    engine = EngineConfig(max_batch=args.max_batch,
                          max_queue=max(4 * args.max_batch, args.requests),
                          max_context=max(field_default(EngineConfig, "max_context"), context))
    cap = max(field_default(ServeSettings, "max_tokens_cap"), args.max_tokens)
    return ServeConfig(engine=engine, settings=ServeSettings(
        model_name=args.preset, max_tokens_cap=cap, temperature=args.temperature,
        top_p=args.top_p))


def start_ours(ours: ServeConfig, config, params, tokenizer, stack: contextlib.ExitStack):
    """Our engine and app as `serve` builds them from `ours`, uvicorn in a thread (stopped by
    `stack`); (engine, base URL)."""
    from minimind_jax.serve.command import running_server, serve_model

    app, engine = serve_model(ours, params, config, tokenizer)
    stack.callback(engine.stop)
    url = stack.enter_context(running_server(app))
    return engine, url


def main(argv=None) -> int:
    args = parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    from minimind_jax.errors import UserError
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults

    apply_cpu_defaults()  # ours runs in this process, with the flags `minimind-jax serve` gets

    try:
        run(args)
    except (BenchError, UserError) as err:
        print(f"serve_bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("serve_bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
