"""What the tests share: fixture paths, the jax options every test process runs with, the tiny
model (as a ModelConfig and as CLI flags), the argv of a tiny training run, and child processes
(the scripts in tests/children and the environment they run in)."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from minimind_jax import cli
from minimind_jax.model.config import ModelConfig
from minimind_jax.runtime import compile_cache

REPO_ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHILDREN = pathlib.Path(__file__).parent / "children"
GOLDEN_PATH = FIXTURES / "minimind2_golden.npz"
TOKENIZER_DIR = FIXTURES / "minimind_tokenizer"
MINIMIND3_GOLDEN_PATH = FIXTURES / "minimind3_golden.npz"
MINIMIND3_TOKENIZER_DIR = FIXTURES / "minimind3_tokenizer"
PRETRAIN_JSONL = FIXTURES / "pretrain.jsonl"
SFT_JSONL = FIXTURES / "sft.jsonl"

# jax options of the pytest process (conftest) and of every child (subprocess_env): exact float32
# matmuls on CPU; implicit rank promotion hides shape bugs (as nanodo), so every broadcast in the
# package is explicit. jax reads each option from the environment variable of its upper-case name.
JAX_OPTIONS = {"jax_default_matmul_precision": "highest", "jax_numpy_rank_promotion": "raise"}
# The test run's persistent compilation cache (a temporary folder made by conftest), shared by
# the pytest processes and their children; every program is kept, however quick to compile.
TEST_COMPILE_CACHE = "MINIMIND_JAX_TEST_COMPILE_CACHE"


def compile_cache_options() -> dict:
    """jax options that point a process at the test run's compilation cache (none outside a
    test run)."""
    folder = os.environ.get(TEST_COMPILE_CACHE)
    if not folder:
        return {}
    return {"jax_compilation_cache_dir": folder, "jax_persistent_cache_min_compile_time_secs": 0}

# The tiny model of the tests: 2 layers of width 64, 4 query and 2 KV heads, 64-token context.
TINY_SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
TINY_CONFIG = ModelConfig(max_seq_len=64, **TINY_SHAPE)
TINY_SHAPE_FLAGS = [flag for name, value in TINY_SHAPE.items()
                    for flag in (f"--{name}", str(value))]
TINY_FLAGS = ["--max_seq_len", "64", *TINY_SHAPE_FLAGS, "--dtype", "float32"]
TINY_MINIMIND3_FLAGS = ["--arch", "minimind3", "--recipe", "minimind3", *TINY_FLAGS]  # minimind-3's


def tiny_run_argv(command: str, out_dir, cache_dir, *extra, data=None) -> list[str]:
    """argv of a tiny `command` run (pretrain or sft) on the fixture data (pretrain.jsonl or
    sft.jsonl unless `data`) with MiniMind2's tokenizer; `extra` flags come last and win."""
    data = data or (PRETRAIN_JSONL if command == "pretrain" else SFT_JSONL)
    return [command, "--data_path", str(data), "--tokenizer", str(TOKENIZER_DIR),
            "--out_dir", str(out_dir), "--cache_dir", str(cache_dir), *TINY_FLAGS,
            *map(str, extra)]


def metrics(run_dir) -> list[dict]:
    """The records of a run folder's metrics.jsonl."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def golden_state_dict(golden: dict, prefix: str) -> dict:
    """The reference state dict stored under `prefix` (e.g. "dense/init/"), tied key restored
    (MiniMind2's `output.weight` or minimind-3's `lm_head.weight`)."""
    sd = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    if "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def user_env() -> dict:
    """A child's environment as a user's shell gives it: none of the tests' jax options (the
    package must be exact without them) and no XLA_FLAGS; the test run's compilation cache."""
    env = subprocess_env()
    for name in (*JAX_OPTIONS, "xla_flags"):
        env.pop(name.upper(), None)
    return env


def run_command(argv: list, entry_point: bool = False, cwd=None) -> str:
    """Run a CLI command to exit status 0 and return its standard output: in this process
    (`cli.main(argv)`, which leaves the process's XLA flags alone), or, with `entry_point`, as a
    user runs it, `python -m minimind_jax.cli ...` in a child with user_env() (in `cwd`), where
    the entry point applies its XLA:CPU flags, huge pages and decode options first."""
    argv = list(map(str, argv))
    if entry_point:
        proc = subprocess.run([sys.executable, "-m", "minimind_jax.cli", *argv], env=user_env(),
                              cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    sys.stdout.write(out.getvalue())
    assert code == 0
    return out.getvalue()


def run_cli_from_init(tmp_path, command: str, data, init_sd: dict, args: list[str],
                      entry_point: bool = False):
    """Run `command` through the CLI (see run_command) from the weights `init_sd` (saved as .npz
    for --init_from); (run folder, metrics.jsonl records), the records checked to be one per
    micro-step."""
    init = tmp_path / "init.npz"
    np.savez(init, **init_sd)
    argv = [command, "--data_path", str(data), "--out_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--init_from", str(init), *args]
    run_command(argv, entry_point)
    run_dir = tmp_path / "out" / (("pretrain" if command == "pretrain" else "full_sft")
                                  + ("_64_moe" if "--use_moe" in args else "_64"))
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(len(records)))
    return run_dir, records


def subprocess_env(n_devices: int | None = None) -> dict:
    """Environment for a child process: this checkout first on PYTHONPATH, the tests' jax
    options (JAX_OPTIONS), the test run's compilation cache, never the user's (the CLI's own
    default folder is off; test_compile_cache tests it in a temp folder), and optionally N host
    CPU devices."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    options = JAX_OPTIONS | compile_cache_options()
    env.update({name.upper(): str(value) for name, value in options.items()})
    env[compile_cache.ENV_SWITCH] = "0"
    if n_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n_devices}").strip()
    return env


def child_argv(script: str, *args) -> list[str]:
    """Command line running tests/children/`script`.py with `args` in this Python."""
    return [sys.executable, str(CHILDREN / f"{script}.py"), *map(str, args)]


# Where assert_within also appends each figure it checks, as a JSON line (unset: nowhere); the
# table of measured figures and bounds is made from it (tests/figures_table.py).
FIGURES_LOG = "MINIMIND_JAX_TEST_FIGURES"


def max_abs_diff(got, expected) -> float:
    """The largest |got - expected| over two arrays (or sequences) of the same shape."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(got - expected).max()) if got.size else 0.0


def max_rel_diff(got, expected) -> float:
    """The largest |got - expected| / |expected| over two arrays of the same shape (grad norms)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float((np.abs(got - expected) / np.abs(expected)).max()) if got.size else 0.0


def assert_within(what: str, measured: float, bound: float) -> float:
    """Assert `measured` (a max |ours - reference|) <= `bound`, with both in the message (and in
    the FIGURES_LOG file when set). Bounds sit at about 3x the figure measured on the CPU in
    float32, so a behaviour that moves a golden by a few times its noise fails."""
    measured = float(measured)
    line = f"{what}: measured {measured:.3g}, bound {bound:.3g}"
    print(line)
    if log := os.environ.get(FIGURES_LOG):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "measured": measured,
                                "bound": bound}) + "\n")
    assert measured <= bound, line
    return measured


def max_tree_diff(a, b) -> float:
    """The largest |a - b| over two pytrees of arrays of the same structure."""
    import jax

    return max(max_abs_diff(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_same_run(what: str, expected: list[dict], actual: list[dict], loss_bound: float,
                    norm_bound: float) -> float:
    """Two runs' metrics.jsonl records: the same steps and updates, losses within `loss_bound`
    and pre-clip grad norms within `norm_bound` (relative). Returns the max loss diff."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    assert [r["update"] for r in actual] == [r["update"] for r in expected]
    assert [("grad_norm" in r) for r in actual] == [("grad_norm" in r) for r in expected]
    assert_within(f"{what}: grad norm (relative)",
                  max_rel_diff([r["grad_norm"] for r in actual if "grad_norm" in r],
                               [r["grad_norm"] for r in expected if "grad_norm" in r]),
                  norm_bound)
    return assert_within(f"{what}: loss", max_abs_diff([r["loss"] for r in actual],
                                                       [r["loss"] for r in expected]), loss_bound)


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.005):
    """Poll `predicate` every `poll_s` seconds until it returns something true (returned);
    after `timeout_s` seconds raise AssertionError naming `what` the test waited for, so a
    wait that never ends fails in its own test instead of hanging the run."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(poll_s)
    return result


def greedy_by_recomputation(params, config, prompt, n_new, eos_id=None, width=None):
    """Greedy decoding written apart from the package's decoder (no KV cache, no left padding,
    no sampling code): for every new token the whole sequence, right-padded to `width`
    (default: prompt + n_new, one compilation), goes through the model's apply and the last
    real position's argmax is taken; stops after `eos_id`. Right padding cannot change a
    causal model's logits at the real positions."""
    import jax
    import jax.numpy as jnp

    from minimind_jax.model.transformer import MiniMind

    forward = jax.jit(lambda p, ids: MiniMind(config).apply({"params": p}, ids)[0])
    width = width or len(prompt) + n_new
    ids, new = list(prompt), []
    for _ in range(n_new):
        padded = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
        token = int(jnp.argmax(forward(params, padded)[0, len(ids) - 1]))
        new.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return new


def answer_by_hf_tokenizers(tokenizer_dir, new: list[int], eos_id: int) -> str:
    """The text of generated tokens as the references decode a reply (EOS left out,
    skip_special_tokens=True), by the `tokenizers` library straight from tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(pathlib.Path(tokenizer_dir) / "tokenizer.json"))
    return tokenizer.decode([t for t in new if t != eos_id], skip_special_tokens=True)
