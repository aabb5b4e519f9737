"""How soon `minimind-jax serve` answers after launch, and when its warm-up is done, with an
empty compilation cache (a first start), as a user starts it: a weights file of random
params, the fixture tokenizer, `serve --ckpt FILE`.

    python benchmarks/serve_start_bench.py --shape 128x2 --shape minimind2-small
    python benchmarks/serve_start_bench.py --checkout /tmp/older_checkout --checkout .

Per checkout (its own sources first on the path: the server runs in its folder) and shape,
in a fresh process each, one after another: seconds from launch to /health answering, to the
first chat answer (a short question, 64 new tokens, greedy), and to the warm-up's end
(/health's `warming` false), with the program count of the warm-up. Timing does not depend
on the weights, so they are random.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "minimind_tokenizer"
SHAPES = {"128x2": {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
          "minimind2-small": {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2}}
QUESTION = "请用三句话介绍一下长城的历史，以及它为什么在今天仍然吸引着来自世界各地的游客。"


def weights_file(shape: dict, folder: Path) -> Path:
    """A float32 .npz of random params of `shape` (the vocabulary of the fixture tokenizer)."""
    from minimind_jax.model import weights
    from minimind_jax.model.config import ModelConfig
    from minimind_jax.model.transformer import init_params

    config = ModelConfig(**shape, vocab_size=6400, max_seq_len=1024)
    path = folder / f"random_{shape['dim']}x{shape['n_layers']}.npz"
    weights.save_state_dict(weights.state_dict_from_params(init_params(config, 0), config),
                            path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_start(checkout: Path, shape: dict, weights: Path, timeout: float) -> dict:
    import httpx

    port, started = free_port(), time.perf_counter()
    flags = [x for name, value in shape.items() for x in (f"--{name}", str(value))]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
               "PYTHONPATH": str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        server = subprocess.Popen(
            [sys.executable, "-m", "minimind_jax.cli", "serve", "--ckpt", str(weights),
             "--tokenizer", str(TOKENIZER), *flags, "--port", str(port), "--log_level",
             "warning"], env=env, cwd=checkout, stderr=subprocess.PIPE, text=True)
        url, result = f"http://127.0.0.1:{port}", {}
        try:
            while "up_s" not in result:
                if server.poll() is not None or time.perf_counter() - started > timeout:
                    raise SystemExit(f"error: the server did not start: "
                                     f"{server.stderr.read()[-2000:] if server.stderr else ''}")
                try:
                    httpx.get(url + "/health", timeout=2)
                    result["up_s"] = time.perf_counter() - started
                except httpx.TransportError:
                    time.sleep(0.1)
            reply = httpx.post(url + "/v1/chat/completions", timeout=timeout, json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64,
                "temperature": 0})
            reply.raise_for_status()
            result["first_answer_s"] = time.perf_counter() - started
            while time.perf_counter() - started < timeout:
                health = httpx.get(url + "/health", timeout=10).json()
                if not health.get("warming", False):
                    result["warm_up_done_s"] = time.perf_counter() - started
                    result["programs"] = health.get("programs_total")
                    break
                time.sleep(0.5)
        finally:
            server.terminate()
            server.wait(60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path,
                        help="a minimind_jax checkout to start (repeatable; default: this one)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="model shape (repeatable; default: both)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per start")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.shape or sorted(SHAPES):
            weights = weights_file(SHAPES[name], Path(folder))
            for checkout in checkouts:
                result = one_start(checkout, SHAPES[name], weights, args.timeout)
                rows.append((checkout, name, result))
                print(checkout, name, result, flush=True)
    print("\n| checkout | shape | /health up | first answer | warm-up done | programs |")
    print("|---|---|---|---|---|---|")
    for checkout, name, r in rows:
        print(f"| {checkout.name} | {name} | {r['up_s']:.1f} s | {r['first_answer_s']:.1f} s | "
              f"{r.get('warm_up_done_s', float('nan')):.1f} s | {r.get('programs')} |")


if __name__ == "__main__":
    main()
