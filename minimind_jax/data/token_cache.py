"""Token cache, the second stage of the data path: a JSONL dataset's samples tokenized once,
streamed to disk, memory-mapped for training. Previous stage: `samples`; next: `rows`.

An entry is a folder holding `ids.npy` (every sample's token ids back to back, uint16, or uint32
for vocabularies over 65536), `offsets.npy` (int64 [N + 1]: sample i is ids[offsets[i]:
offsets[i + 1]]) and `meta.json`. Samples are stored truncated to max_seq_len and unpadded; the
SFT loss mask is recomputed per batch from the ids (cheap), so nothing else is needed.

The entry's name carries a key over the data file (size, mtime, sampled content hash), the
tokenizer's files, the stage and max_seq_len; any change gives a new entry. Packing does not
change the cached samples (it is a layout over them), so `pack` is not part of the key. An entry
is built in a temporary folder and renamed into place, so a crash never leaves half a cache.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimind_jax.data import minimind3
from minimind_jax.data.samples import (
    SkipReport,
    iter_jsonl_chunks,
    open_data_file,
    sample_format,
    sft_mask_markers,
    truncate_ids,
)
from minimind_jax.errors import UserError
from minimind_jax.model.config import ARCHES


@dataclass(frozen=True)
class SampleRules:
    """How one reference turns JSONL records into cached id lists."""

    read_record: object  # record -> text / messages, or LineProblem
    sample_ids: object  # (tokenizer, records, None) -> id lists, untruncated
    truncate: object  # (id lists, max_seq_len) -> id lists
    markers: object  # tokenizer -> (start ids, end ids) of a supervised span


def sample_rules(stage: str, rules: str) -> SampleRules:
    """MiniMind2's (shared/SPEC.md) or minimind-3's (data/minimind3.py) rules for `stage`."""
    if rules not in ARCHES:
        raise UserError(f"unknown sample rules {rules!r}; expected one of {ARCHES}")
    minimind2 = sample_format(stage)
    if rules == "minimind2":
        return SampleRules(minimind2.read_record, minimind2.sample_ids, truncate_ids,
                           sft_mask_markers)
    if stage == "pretrain":
        return SampleRules(minimind2.read_record, minimind3.pretrain_ids_batch,
                           minimind3.pretrain_truncate, minimind3.sft_markers)
    return SampleRules(minimind3.sft_messages, minimind3.sft_ids_batch, truncate_ids,
                       minimind3.sft_markers)

CACHE_FORMAT = 1
CACHE_DIRNAME = ".minimind_cache"
_NPY_HEADER_BYTES = 128  # fixed, so the header can be written once the length is known
_HASH_BLOCK = 1 << 16
_HASH_BLOCKS = 64


@dataclass(frozen=True)
class TokenCache:
    """A prepared dataset: `ids` (memmap) and `offsets`, plus `meta` (stage, sizes, stats)."""

    path: Path
    ids: np.ndarray
    offsets: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


# --- keys --------------------------------------------------------------------------------------

def data_file_signature(path: Path) -> dict:
    """Size, mtime and a sha256 over the head, tail and 62 evenly spread 64 KiB blocks: O(1)
    in the file size, while size + mtime catch the edits the sample could miss."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= _HASH_BLOCK * _HASH_BLOCKS:
            digest.update(f.read())
        else:
            step = (stat.st_size - _HASH_BLOCK) / (_HASH_BLOCKS - 1)
            for k in range(_HASH_BLOCKS):
                f.seek(int(k * step))
                digest.update(f.read(_HASH_BLOCK))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": digest.hexdigest()}


def cache_entry_path(data_path, tokenizer, stage: str, max_seq_len: int,
                     cache_dir=None, rules: str = "minimind2") -> Path:
    """Where the cache entry for these inputs lives (whether or not it exists yet)."""
    data_path = Path(data_path)
    key_fields = {"format": CACHE_FORMAT, "stage": stage, "max_seq_len": max_seq_len,
                  "data": data_file_signature(data_path), "tokenizer": tokenizer.fingerprint}
    if rules != "minimind2":  # MiniMind2 entries keep the keys they always had
        key_fields["rules"] = rules
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else data_path.parent / CACHE_DIRNAME
    return root / f"{data_path.name}.{stage}.L{max_seq_len}.{key}"


# --- reading -----------------------------------------------------------------------------------

def load_token_cache(path) -> TokenCache:
    """Open a finished cache entry (memory-mapped)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        ids = np.load(path / "ids.npy", mmap_mode="r")
        offsets = np.load(path / "offsets.npy")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable token cache ({err}); delete it to rebuild") from err
    if meta.get("format") != CACHE_FORMAT or len(offsets) != meta["num_samples"] + 1:
        raise UserError(f"{path}: token cache of another format or incomplete; delete it")
    return TokenCache(path, ids, offsets, meta)


# --- writing -----------------------------------------------------------------------------------

class _NpyAppender:
    """A 1-D .npy file written by appending chunks; the header is filled in on close."""

    def __init__(self, path: Path, dtype):
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self._file.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        header = repr({"descr": self.dtype.str, "fortran_order": False,
                       "shape": (self.length,)}).encode("latin1")
        prefix = b"\x93NUMPY\x01\x00"
        room = _NPY_HEADER_BYTES - len(prefix) - 2
        header = header.ljust(room - 1) + b"\n"
        self._file.seek(0)
        self._file.write(prefix + len(header).to_bytes(2, "little") + header)
        self._file.close()

    def abandon(self) -> None:
        self._file.close()


def _in_background(iterator: Iterator, maxsize: int = 2) -> Iterator:
    """Run `iterator` in a thread, `maxsize` items ahead; errors re-raise in the consumer."""
    items: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            put((done, err))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, err = items.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _ordered_map(fn, items: Iterator, workers: int) -> Iterator:
    """`fn` over `items` on `workers` threads, results in input order, few pending at once."""
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def default_workers() -> int:
    """Tokenizing threads: 2 on small machines, up to 4 on many cores."""
    return max(2, min(4, (os.cpu_count() or 1) // 4))


def _id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _remove_stale_temporaries(root: Path) -> None:
    """Remove temporary entries left by crashed runs on this host (their pid is gone)."""
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(ValueError, IndexError):
            pid = int(tmp.name.rsplit("-", 1)[1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:
                pass


def _progress_bar(total: int, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                disable=disable, smoothing=0.1)


def prepare_token_cache(data_path, tokenizer, stage: str, max_seq_len: int, *, cache_dir=None,
                        skip_bad_lines: bool = False, force: bool = False,
                        progress: bool | None = None, chunk_bytes: int = 1 << 20,
                        workers: int | None = None, log=None,
                        rules: str = "minimind2") -> TokenCache:
    """The token cache of `data_path` for (tokenizer, stage, max_seq_len): reused when it
    exists, else built by streaming the JSONL through batched tokenization (memory bounded by
    a few `chunk_bytes` chunks, whatever the file size). `log(str)` receives a summary.
    `rules`: whose sample rules (`minimind2` or `minimind3`, see `sample_rules`)."""
    sample_format(stage)  # an unknown format fails here
    if max_seq_len < 2:
        raise UserError(f"max_seq_len must be at least 2, got {max_seq_len}")
    data_path = Path(data_path)
    open_data_file(data_path).close()  # a missing or unreadable file fails here
    log = log or (lambda message: print(message, file=sys.stderr))
    entry = cache_entry_path(data_path, tokenizer, stage, max_seq_len, cache_dir, rules)
    if entry.is_dir() and not force:
        log(f"token cache: reusing {entry}")
        return load_token_cache(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{entry.parent}: cannot create the cache folder ({err.strerror}); "
                        "pass --cache_dir") from None
    _remove_stale_temporaries(entry.parent)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write_entry(tmp, data_path, tokenizer, stage, max_seq_len, skip_bad_lines,
                            progress, chunk_bytes, workers or default_workers(),
                            sample_rules(stage, rules), rules)
        if force:
            shutil.rmtree(entry, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # another process finished the same entry first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = meta["data"]["size"] / 2**20 / max(meta["seconds"], 1e-9)
    what = f"{meta['num_samples']:,} {stage} samples"
    if rules == "minimind3" and stage == "sft":
        what = (f"{meta['num_samples'] // minimind3.SLOTS:,} minimind-3 conversations "
                f"({minimind3.SLOTS} id lists each: as is, think-stripped, system-coin flag)")
    log(f"prepared {what}, {meta['num_tokens']:,} tokens "
        f"({meta['num_truncated']:,} truncated to {max_seq_len}) in {meta['seconds']:.1f} s "
        f"({rate:.1f} MiB/s) -> {entry}")
    if meta["skipped_lines"]:
        log(meta["skip_summary"])
    return load_token_cache(entry)


def _write_entry(folder: Path, data_path: Path, tokenizer, stage: str, max_seq_len: int,
                 skip_bad_lines: bool, progress: bool | None, chunk_bytes: int,
                 workers: int, rules: SampleRules, rules_name: str) -> dict:
    started = time.perf_counter()
    signature = data_file_signature(data_path)
    skips = SkipReport(str(data_path))
    sample_ids = rules.sample_ids
    dtype = _id_dtype(tokenizer.vocab_size)
    # JSON parsing runs in a thread, tokenization + conversion to numpy in a few more (the
    # Rust/C++ encoders release the GIL and use every core; several chunks in flight keep the
    # cores busy while one chunk's ids are turned into numpy), writes happen here, in order.
    def tokenize(chunk):
        records, n_bytes = chunk
        ids_lists = sample_ids(tokenizer, records, None)
        lengths = np.fromiter(map(len, ids_lists), np.int64, len(ids_lists))
        n_truncated = int((lengths > max_seq_len).sum())
        lengths = np.minimum(lengths, max_seq_len)
        flat = np.fromiter(itertools.chain.from_iterable(rules.truncate(ids_lists, max_seq_len)),
                           dtype, int(lengths.sum()))
        return flat, lengths, n_truncated, n_bytes

    chunks = _in_background(iter_jsonl_chunks(data_path, stage, skip_bad_lines=skip_bad_lines,
                                              skips=skips, chunk_bytes=chunk_bytes,
                                              read_record=rules.read_record))
    ids_file = _NpyAppender(folder / "ids.npy", dtype)
    offsets_file = _NpyAppender(folder / "offsets.npy", np.int64)
    offsets_file.append(np.zeros(1, np.int64))
    num_tokens = num_samples = num_truncated = 0
    try:
        with _progress_bar(signature["size"], progress) as bar:
            for flat, lengths, n_truncated, n_bytes in _ordered_map(tokenize, chunks, workers):
                ids_file.append(flat)
                offsets_file.append(num_tokens + np.cumsum(lengths))
                num_tokens += len(flat)
                num_samples += len(lengths)
                num_truncated += n_truncated
                bar.update(n_bytes)
                bar.set_postfix(samples=f"{num_samples:,}", refresh=False)
    except BaseException:
        ids_file.abandon()
        offsets_file.abandon()
        raise
    ids_file.close()
    offsets_file.close()
    start_ids, end_ids = rules.markers(tokenizer)
    meta = {
        "format": CACHE_FORMAT, "stage": stage, "max_seq_len": max_seq_len, "rules": rules_name,
        "data": {"path": str(data_path.resolve()), **signature},
        "tokenizer": {"files": [str(p) for p in tokenizer.files],
                      "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "sft_start_ids": start_ids, "sft_end_ids": end_ids,
        "ids_dtype": np.dtype(dtype).name, "num_samples": num_samples, "num_tokens": num_tokens,
        "num_truncated": num_truncated, "skipped_lines": skips.count,
        "skip_summary": skips.summary(), "seconds": time.perf_counter() - started,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta
