"""The docs: the mkdocs site builds with --strict, the README stays short and its links resolve,
and the docs' shell blocks marked `<!-- test: run -->` run as written.

A marked block is a fenced ```bash block right after the line `<!-- test: run -->` (an HTML
comment, invisible on the rendered page). Each runs in a fresh folder laid out as the
reference's checkout is (`dataset/`, `model/minimind_tokenizer`, from the test fixtures, plus
the few files the blocks read: a reference log, a metrics.jsonl, a small `.pth`), with
`minimind-jax` run as `python -m minimind_jax.cli` from this checkout. Mark only blocks that
run on a CPU in seconds.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (
    FIXTURES,
    PRETRAIN_JSONL,
    REPO_ROOT,
    SFT_JSONL,
    TINY_CONFIG,
    TOKENIZER_DIR,
    subprocess_env,
)

DOCS = REPO_ROOT / "docs"
MARK = "<!-- test: run -->"
BLOCK = re.compile(r"^" + re.escape(MARK) + r"\n```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
README_MAX_LINES = 250


def marked_blocks() -> list[tuple[str, str]]:
    """(page:index, block text) of every marked block of docs/*.md."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        found = BLOCK.findall(text)
        assert len(found) == text.count(MARK), f"{page.name}: a {MARK} not before a ```bash block"
        blocks += [(f"{page.name}:{i}", block) for i, block in enumerate(found)]
    return blocks


BLOCKS = marked_blocks()


def test_docs_have_marked_blocks():
    assert len(BLOCKS) >= 5, [name for name, _ in BLOCKS]


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _have("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"),
                    reason="mkdocs, mkdocs-material and mkdocstrings[python] (the docs extra)")
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-f", str(REPO_ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("index.html", "training/index.html", "api/index.html",
                 "post_training_spec/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "TrainConfig" in api and "load_weights" in api  # mkdocstrings rendered them


def test_readme_is_short_and_its_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= README_MAX_LINES
    # The two commands, verbatim (.ci/run runs the second), the README's only bash blocks.
    assert readme.count("```bash\n") == 2
    assert "\npip install -e . && minimind-jax demo\n" in readme
    assert ("\npip install torch==2.13.0 && pip install -e '.[test]' && ruff check . && "
            "python -m pytest -q -n auto --maxprocesses 4\n") in readme
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "no relative links"
    for link in local:
        assert (REPO_ROOT / link).exists(), link


@pytest.fixture
def workspace(tmp_path):
    """A folder laid out as the reference's checkout, with what the marked blocks read."""
    (tmp_path / "dataset").mkdir()
    shutil.copy(PRETRAIN_JSONL, tmp_path / "dataset" / "pretrain_hq.jsonl")
    shutil.copy(SFT_JSONL, tmp_path / "dataset" / "sft_mini_512.jsonl")
    shutil.copy(FIXTURES / "post" / "dpo_pairs.jsonl", tmp_path / "dataset" / "dpo.jsonl")
    shutil.copytree(TOKENIZER_DIR, tmp_path / "model" / "minimind_tokenizer")
    # A reference pretrain log and our metrics over the same micro-steps.
    steps = range(0, 60, 5)
    (tmp_path / "torch_pretrain.log").write_text("".join(
        f"Epoch:[1/1]({s}/60) loss:{8.9 - 0.05 * s:.3f} lr:0.000500000000 epoch_Time:1.0min:\n"
        for s in steps))
    run = tmp_path / "out" / "pretrain_512"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": 0, "loss": 8.9 - 0.05 * s + 1e-4, "lr": 5e-4}) + "\n"
        for s in steps))
    return tmp_path


def _reference_pth(path):
    """A small reference-keyed state dict (the tests' tiny model) at `path`."""
    from minimind_jax.model.transformer import init_params
    from minimind_jax.model.weights import save_state_dict, state_dict_from_params

    save_state_dict(state_dict_from_params(init_params(TINY_CONFIG, 0), TINY_CONFIG), path)


@pytest.mark.parametrize("name,block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_docs_command_block_runs(name, block, workspace):
    if ".pth" in block:
        if not _have("torch"):
            pytest.skip("reading .pth files needs torch")
        _reference_pth(workspace / "pretrain_512.pth")
    cli = f"{sys.executable} -m minimind_jax.cli"
    script = re.sub(r"(^|[;&|(]\s*)minimind-jax\b", lambda m: m.group(1) + cli, block,
                    flags=re.MULTILINE)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workspace,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name}:\n{block}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
