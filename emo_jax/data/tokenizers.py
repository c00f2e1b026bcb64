"""Tokenizers: byte-level (the default, no files), SentencePiece, and Hugging Face tokenizer.json.

Every tokenizer has the same small surface: `encode(text) -> list[int]`, `encode_array(text) ->
int32 array` (what the pipeline calls), `decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, and a `spec` string that rebuilds it (`make_tokenizer(tokenizer.spec)`). The pipeline
appends `eos_id` to every document; `pad_id` only fills padded positions (segment id 0), which
the loss never reads, so its value never matters to training.

Specs (`data.tokenizer`): `'byte'`, `'sentencepiece:PATH'` (a `.model` file, e.g. one written by
`python -m emo_jax.data.train_tokenizer`), `'hf:PATH'` (a `tokenizer.json`, or a folder holding
one; needs the optional `tokenizers` package; its special tokens are those that
`tokenizer_config.json` / `special_tokens_map.json` beside it name, else the usual pieces).
Inside a model directory the path is relative to the directory (`hf:tokenizer/tokenizer.json`):
saving a model copies the tokenizer's files into its `tokenizer/` folder, and restoring one
resolves the path against the directory (see the end of this module).

Tokenizers pickle as their spec, so Grain worker processes rebuild them rather than receiving
C++ objects. This module never downloads anything.
"""

from __future__ import annotations

import json
import os

import numpy as np
import sentencepiece as spm

from emo_jax import storage
from emo_jax.config import ConfigError

# Byte tokenizer layout: 8 special ids, then the 256 byte values.
BYTE_PAD, BYTE_BOS, BYTE_EOS = 0, 1, 2
BYTE_OFFSET = 8  # ids 3..7 are reserved
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256

# Special pieces tried, in order, when a tokenizer.json does not say which token is which.
_HF_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>")
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|startoftext|>")
_HF_PAD = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class ByteTokenizer:
    """UTF-8 bytes: byte b -> id b + 8; pad 0, bos 1, eos 2, ids 3..7 reserved; 264 ids."""

    spec = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = BYTE_PAD, BYTE_BOS, BYTE_EOS

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, np.int64).reshape(-1)
        data = ids_N[(ids_N >= BYTE_OFFSET) & (ids_N < BYTE_VOCAB_SIZE)] - BYTE_OFFSET
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer()"


class _FileTokenizer:
    """Shared plumbing of file-backed tokenizers: pickled as their spec, loaded lazily."""

    prefix = ""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.spec = f"{self.prefix}:{path}"
        self._load()

    def __getstate__(self):
        return {"path": self.path, "spec": self.spec}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r})"

    def _load(self):
        raise NotImplementedError


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece `.model` file. Its eos piece ends documents; a missing pad uses id 0."""

    prefix = "sentencepiece"

    def _load(self):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"data.tokenizer: cannot load the SentencePiece model "
                              f"'{self.path}' ({e})") from None
        self.vocab_size = int(self._sp.GetPieceSize())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ConfigError(f"data.tokenizer: the SentencePiece model '{self.path}' has no eos "
                              "piece, which the pipeline needs to end documents; train one with "
                              "eos_id >= 0 (python -m emo_jax.data.train_tokenizer does)")
        self.bos_id = int(self._sp.bos_id())
        self.pad_id = max(int(self._sp.pad_id()), 0)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.EncodeAsIds(text), np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if 0 <= i < self.vocab_size and i not in (self.pad_id, self.eos_id, self.bos_id)]
        return self._sp.DecodeIds(ids)


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` package), without added special tokens."""

    prefix = "hf"

    def _load(self):
        try:  # deferred: `tokenizers` is an optional dependency (emo_jax[hf])
            import tokenizers  # pylint: disable=g-import-not-at-top
        except ImportError:
            raise ConfigError("data.tokenizer: 'hf:' tokenizers need the optional package "
                              "`tokenizers` (pip install 'emo_jax[hf]')") from None
        path = self.path
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"data.tokenizer: no tokenizer.json at '{path}'")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises its own exception type
            raise ConfigError(f"data.tokenizer: cannot load '{path}' ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        named = _hf_named_specials(os.path.dirname(path))  # tokenizer_config.json says first

        def pick(key, names):
            names = ([named[key]] if key in named else []) + list(names)
            return next((vocab[n] for n in names if n in vocab), -1)

        self.eos_id, self.bos_id = pick("eos", _HF_EOS), pick("bos", _HF_BOS)
        self.pad_id = max(pick("pad", _HF_PAD), 0)
        if self.eos_id < 0:
            raise ConfigError(f"data.tokenizer: '{path}' has none of the end-of-document tokens "
                              f"{', '.join(_HF_EOS)}; the pipeline needs one to end documents")

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if 0 <= i < self.vocab_size and i not in (self.eos_id, self.bos_id)]
        return self._tok.decode(ids, skip_special_tokens=True)


def _hf_named_specials(folder: str) -> dict[str, str]:
    """{'eos'|'bos'|'pad': token text} named by tokenizer_config.json / special_tokens_map.json
    beside a tokenizer.json (values may be strings or {"content": ...}); unreadable: {}."""
    named = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key in ("eos", "bos", "pad"):
            value = data.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                named[key] = value
    return named


def make_tokenizer(spec: str):
    """Builds the tokenizer named by a `data.tokenizer` spec; ConfigError for a bad spec."""
    if spec == "byte":
        return ByteTokenizer()
    kind, sep, path = spec.partition(":")
    if sep and storage.is_remote(path):  # e.g. a tokenizer bundled in a gs:// model directory
        if kind == "hf" and not path.endswith(".json"):
            path = storage.join(path, "tokenizer.json")
        if not storage.isfile(path):
            raise ConfigError(f"data.tokenizer: '{path}' does not exist")
        path = storage.local_copy(path)  # the tokenizer libraries read local files only
    if sep and path and kind == "sentencepiece":
        if not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"data.tokenizer: the SentencePiece model '{path}' does not exist")
        return SentencePieceTokenizer(path)
    if sep and path and kind == "hf":
        return HFTokenizer(path)
    raise ConfigError(f"config key 'data.tokenizer' is {spec!r}; valid: 'byte', "
                      "'sentencepiece:PATH' or 'hf:PATH' (a tokenizer.json or its folder)")


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raises ConfigError unless the model's embedding table covers every id of `tokenizer`."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({model_vocab_size}) is smaller than the {tokenizer.vocab_size} ids "
            f"of tokenizer '{tokenizer.spec}'; set model.vocab_size >= {tokenizer.vocab_size}")


# ------------------------------------------------------- tokenizers inside model directories
#
# A model directory (emo_jax/model_files.py) holds the files of its tokenizer in `tokenizer/`
# and names them relative to itself (`hf:tokenizer/tokenizer.json`,
# `sentencepiece:tokenizer/sp.model`), so the directory can move and be copied; reading the
# directory resolves the path against it (`resolve_spec`), writing one copies the files in
# (`bundle_spec`).

TOKENIZER_DIR = "tokenizer"
# Files of a Hugging Face tokenizer that travel with its tokenizer.json.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _split(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    return (kind, path) if sep and path and kind in ("sentencepiece", "hf") else ("", "")


def resolve_spec(spec: str, base_dir: str) -> str:
    """`spec` with a relative file path made absolute against `base_dir` (a model directory)."""
    kind, path = _split(spec)
    if not kind or os.path.isabs(os.path.expanduser(path)) or storage.is_remote(path):
        return spec
    if storage.is_remote(base_dir):
        return f"{kind}:{storage.join(base_dir, path)}"
    return f"{kind}:{os.path.join(os.path.abspath(base_dir), path)}"


def spec_files(spec: str) -> list[str]:
    """The existing files a tokenizer spec reads (first: the one it names); [] for 'byte'."""
    kind, path = _split(spec)
    path = os.path.abspath(os.path.expanduser(path)) if kind else ""
    if kind == "sentencepiece":
        return [path] if os.path.isfile(path) else []
    if kind == "hf":
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        main = os.path.join(folder, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(main):
            return []
        return [main] + [os.path.join(folder, n) for n in HF_TOKENIZER_FILES[1:]
                         if os.path.isfile(os.path.join(folder, n))]
    return []


def bundle_spec(spec: str, model_dir: str) -> str:
    """Copies the tokenizer files of `spec` into MODEL_DIR/tokenizer/ and returns the spec that
    names them relative to MODEL_DIR; 'byte', or a spec whose files are missing, comes back
    unchanged."""
    kind, _ = _split(spec)
    files = spec_files(spec)
    if not files:
        return spec
    target = storage.join(model_dir, TOKENIZER_DIR)
    storage.makedirs(target)
    for path in files:
        if storage.absolute(storage.join(target, os.path.basename(path))) != path:
            storage.copy_file(path, storage.join(target, os.path.basename(path)))
    return f"{kind}:{TOKENIZER_DIR}/{os.path.basename(files[0])}"


def special_token_ids(tokenizer) -> dict:
    """{'pad_token_id', 'eos_token_id', 'bos_token_id'} of a tokenizer (None: it has none), as
    the Hugging Face config.json spells them."""
    ids = {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
           "bos_token_id": tokenizer.bos_id}
    return {k: (int(v) if v is not None and v >= 0 else None) for k, v in ids.items()}
