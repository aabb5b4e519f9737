"""One tokenizer interface over two backends: Hugging Face `tokenizers` and sentencepiece.

`load_tokenizer(path)` accepts a folder holding `tokenizer.json` (+ `tokenizer_config.json`, whose
Jinja chat template and special-token names are used), a sentencepiece `.model` file, or a
folder holding one. `locate_tokenizer` is the one search for a tokenizer folder that no
--tokenizer names. Special-token strings in raw text (`<unk>`, `<s>`, `</s>`) encode to their
ids in both backends, and no BOS/EOS is added automatically (the reference's behaviour).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

from minimind_jax.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


def default_chat_template() -> str:
    """The MiniMind chat template (used when a tokenizer folder carries none)."""
    text = resources.files("minimind_jax").joinpath("templates/minimind_chat_template.jinja")
    return text.read_text(encoding="utf-8").rstrip("\n")


def _template_environment():
    """A Jinja environment with the settings of transformers' apply_chat_template, so
    templates written for it render identically."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    # transformers' own `tojson`: no HTML escaping, keys in order (minimind-3's tools block).
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    return env


def compile_chat_template(template: str, where: str = "chat template"):
    """A Jinja chat template compiled as transformers' apply_chat_template compiles it."""
    from jinja2.exceptions import TemplateError

    try:
        return _template_environment().from_string(template)
    except TemplateError as err:
        raise UserError(f"{where}: chat template does not compile: {err}") from err


def _token_name(config: dict, key: str, default: str | None) -> str | None:
    value = config.get(key, default)
    if isinstance(value, dict):  # some configs store {"content": "<s>", ...}
        value = value.get("content", default)
    return value


def _read_config(folder: Path | None) -> dict:
    if folder is None or not (folder / TOKENIZER_CONFIG).is_file():
        return {}
    path = folder / TOKENIZER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def _fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Tokenizer:
    """Backend-independent part: special ids, chat template, fingerprint.

    Backends implement `_encode_batch(texts)`, `_decode(ids, skip_special_tokens)`,
    `token_to_id(token)` and `vocab_size`.
    """

    def __init__(self, files: Sequence[Path], config: dict):
        self.files = tuple(files)
        self.config = config
        self.bos_token = _token_name(config, "bos_token", "<s>")
        self.eos_token = _token_name(config, "eos_token", "</s>")
        self.unk_token = _token_name(config, "unk_token", "<unk>")
        self.pad_token = _token_name(config, "pad_token", None) or self.unk_token
        self.chat_template = config.get("chat_template") or default_chat_template()
        where = self.files[0]
        self.bos_id = self._special_id(self.bos_token, "bos_token", where)
        self.eos_id = self._special_id(self.eos_token, "eos_token", where)
        self.pad_id = self._special_id(self.pad_token, "pad_token", where)

    def _special_id(self, token: str, field: str, where: Path) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise UserError(f"{where}: {field} {token!r} is not in the vocabulary")
        return token_id

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the tokenizer's files: part of every token-cache key."""
        return _fingerprint(self.files)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings parsed, nothing added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel native threads."""
        return self._encode_batch(list(texts))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special_tokens`."""
        return self._decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            **extra) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the Jinja chat template."""
        return self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
            pad_token=self.pad_token, **extra)

    @cached_property
    def chat_template_variables(self) -> frozenset[str]:
        """Names the chat template reads from its caller, e.g. `tools` or `open_thinking`
        (minimind-3's), beside `messages` and `add_generation_prompt`."""
        from jinja2 import meta
        from jinja2.exceptions import TemplateError

        try:
            tree = _template_environment().parse(self.chat_template)
        except TemplateError as err:
            raise UserError(f"{self.files[0].parent}: chat template does not compile: {err}"
                            ) from err
        return frozenset(meta.find_undeclared_variables(tree))

    @cached_property
    def _compiled_template(self):
        return compile_chat_template(self.chat_template, where=str(self.files[0].parent))

    # --- backend hooks ---
    vocab_size: int

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """`tokenizer.json` read with the Hugging Face `tokenizers` library (Rust, batched)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = folder / TOKENIZER_JSON
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception on a malformed file
            raise UserError(f"{path}: cannot load tokenizer ({err})") from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        files = [path] + ([folder / TOKENIZER_CONFIG] if (folder / TOKENIZER_CONFIG).is_file()
                          else [])
        super().__init__(files, _read_config(folder))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; control/unknown pieces are matched in text here, in Python,
    because sentencepiece itself never produces them from text."""

    def __init__(self, model_path: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{model_path}: cannot load sentencepiece model ({err})") from err
        self.vocab_size = self._sp.get_piece_size()
        sp = self._sp
        self._special_ids = {i for i in range(self.vocab_size)
                             if sp.is_control(i) or sp.is_unknown(i)}
        self._special_piece = {sp.id_to_piece(i): i for i in self._special_ids}
        names = sorted(self._special_piece, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        folder = model_path.parent
        config = _read_config(folder)
        defaults = {"unk_token": sp.id_to_piece(sp.unk_id())}
        if sp.bos_id() >= 0:
            defaults["bos_token"] = sp.id_to_piece(sp.bos_id())
        if sp.eos_id() >= 0:
            defaults["eos_token"] = sp.id_to_piece(sp.eos_id())
        files = [model_path] + ([folder / TOKENIZER_CONFIG]
                                if (folder / TOKENIZER_CONFIG).is_file() else [])
        super().__init__(files, {**defaults, **config})

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id maps every unknown piece to unk_id; only <unk> itself may return it.
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Split each text at special-token strings, encode all plain parts in one threaded
        # native call, then stitch the parts back together.
        split = [self._special_re.split(t) for t in texts]
        plain = [part for parts in split for part in parts[0::2]]
        encoded = iter(self._sp.encode(plain, num_threads=os.cpu_count() or 1))
        out = []
        for parts in split:
            ids = list(next(encoded))
            for special in parts[1::2]:
                ids.append(self._special_piece[special])
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces, run = [], []
        for i in ids:
            if i in self._special_ids:
                pieces.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    pieces.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        pieces.append(self._sp.decode(run))
        return "".join(pieces)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at `path`: a folder with tokenizer.json, a .model file, or a folder
    holding one `.model` (tokenizer.model preferred)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return HFTokenizer(path)
        models = sorted(path.glob("*.model"))
        if (path / SENTENCEPIECE_MODEL).is_file():
            return SentencePieceTokenizer(path / SENTENCEPIECE_MODEL)
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        if len(models) > 1:
            raise UserError(f"{path}: several .model files, name one: "
                            + ", ".join(m.name for m in models))
        raise UserError(f"{path}: no {TOKENIZER_JSON} or sentencepiece .model in this folder")
    if not path.exists():
        raise UserError(f"{path}: tokenizer not found")
    raise UserError(f"{path}: expected a tokenizer folder or a sentencepiece .model file")


def holds_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a saved tokenizer (tokenizer.json or a sentencepiece
    tokenizer.model)."""
    return any((folder / name).is_file() for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))


def locate_tokenizer(explicit: str | os.PathLike | None, candidates: Sequence[Path], *,
                     what: str) -> Path:
    """The tokenizer folder: `explicit` (--tokenizer; `load_tokenizer` checks it) if given, else
    the first of `candidates` that `holds_tokenizer`; else one UserError saying that `what`
    needs one and every folder looked in."""
    if explicit:
        return Path(explicit)
    for folder in candidates:
        if holds_tokenizer(folder):
            return Path(folder)
    raise UserError(f"no tokenizer for {what}: pass --tokenizer DIR (a folder with "
                    f"{TOKENIZER_JSON} or a sentencepiece {SENTENCEPIECE_MODEL}); looked in "
                    + ", ".join(str(c) for c in candidates))


def beside_weights(weights: str | os.PathLike) -> list[Path]:
    """Where a tokenizer saved with weights lies (a run copies it into its folder): `tokenizer/`
    in, or else the folder itself of, the weights (a run, checkpoint or file), its parent and its
    grandparent, in that order."""
    path = Path(weights)
    return [folder / name for folder in (path, path.parent, path.parent.parent)
            for name in ("tokenizer", ".")]


def training_tokenizer_candidates(generation, *, run_dir: Path | None = None,
                                  start_dir: Path | None = None) -> list[Path]:
    """Training's search: the `tokenizer/` copy of the run (`run_dir`, when resuming) and of the
    run it starts from (`start_dir`: sft's pretrain run, or an --init_from run folder), then the
    reference's own folders (`generation.tokenizer_dirs`, model.generation): MiniMind2's
    ./model/minimind_tokenizer, or minimind-3's ./model and ../model (its scripts run from
    trainer/)."""
    candidates = [folder / "tokenizer" for folder in (run_dir, start_dir) if folder is not None]
    return candidates + [Path(folder) for folder in generation.tokenizer_dirs]
