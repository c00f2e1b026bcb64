"""Document sources: JSONL, text files, ArrayRecord, TFDS and the bundled corpus, by spec string.

A source is a random-access sequence (a Grain `RandomAccessDataSource`) whose item `i` is
either a document `{'text': str, 'domain': str | None}` or a bad-record marker
`{'bad': REASON, 'where': 'PATH (record i)'}`; the pipeline counts and drops the markers (or
raises, with `data.on_bad_record='error'`). Reasons: 'invalid_json', 'missing_text',
'empty' (nothing but whitespace), 'not_utf8'.

Spec grammar (`data.train_sources`, `data.eval_sources`, `read_documents`): comma-separated
entries, each optionally followed by `@WEIGHT` (a positive number; default 1):

  PATH.jsonl | PATH.jsonl.gz   one JSON object per line; text under `text_field` (default
                               'text'), optional string `domain`. Blank lines are ignored.
                               Gzipped files are decompressed into memory (use plain JSONL or
                               ArrayRecord for large corpora).
  PATH.array_record            ArrayRecord records: UTF-8 JSON objects as in JSONL, or raw UTF-8
                               text (one document per record). Record 0 decides which, for
                               every file of the entry.
  PATH (any other file)        one plain-text document (UTF-8).
  DIR or GLOB (*, ?, [)        every matching file (a folder: all files below it, hidden ones
                               excepted), sorted, each read by its suffix as above.
  tfds:NAME[/CONFIG][:VERSION]:SPLIT
                               a prepared TFDS dataset read through `tfds.data_source` (no
                               TensorFlow, never downloads), from `data.tfds_data_dir` (or
                               $TFDS_DATA_DIR, else ~/tensorflow_datasets). SPLIT may be sliced:
                               `train[:90%]`. The text feature is `text_field`; a `domain`
                               feature is carried when present.
  bundled:train | bundled:eval the corpus shipped in emo_jax/data/corpus (see its README.md).

`''` means `bundled:train` for training and `bundled:eval` for evaluation. Paths with commas
are not supported. Missing paths and unknown TFDS datasets raise `DataError` naming them.
This module reads data; it never tokenizes and never downloads.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import threading

from absl import logging
import numpy as np

from emo_jax.config import ConfigError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BAD_REASONS = ("invalid_json", "missing_text", "empty", "not_utf8")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_SCAN_CHUNK = 1 << 26  # bytes scanned at once when indexing JSONL lines


class DataError(ConfigError):
    """A data source is missing, empty or holds a bad record (with on_bad_record='error')."""


def bad_record_error(marker: dict) -> DataError:
    """The error raised for a bad-record marker when data.on_bad_record='error'."""
    return DataError(f"bad record ({marker['bad']}) at {marker['where']}; set "
                     "data.on_bad_record='skip' to skip and count such records")


# --------------------------------------------------------------------------- record parsing

def _bad(reason: str, where: str) -> dict:
    return {"bad": reason, "where": where}


def _text_doc(text: str, domain, where: str) -> dict:
    if not text.strip():
        return _bad("empty", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates smuggled in through JSON escapes
        return _bad("not_utf8", where)
    return {"text": text, "domain": domain if isinstance(domain, str) else None}


def _json_doc(raw: bytes, text_field: str, where: str) -> dict:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return _bad("not_utf8", where)
    except ValueError:
        return _bad("invalid_json", where)
    if not isinstance(obj, dict):
        return _bad("invalid_json", where)
    text = obj.get(text_field)
    if not isinstance(text, str):
        return _bad("missing_text", where)
    return _text_doc(text, obj.get("domain"), where)


def _raw_text_doc(raw: bytes, where: str) -> dict:
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return _bad("not_utf8", where)
    return _text_doc(text, None, where)


# --------------------------------------------------------------------------- sources

class JsonlSource:
    """JSON Lines files (optionally gzipped) with a byte-offset index of their non-blank lines."""

    def __init__(self, paths: list[str], text_field: str = "text"):
        self.paths, self.text_field = list(paths), text_field
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        spans = [self._index(i) for i in range(len(self.paths))]
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]
        self._cum = np.cumsum([0] + [len(s) for s in self._starts])

    def _handle(self, file_index: int):
        """Per-process handle: decompressed bytes for .gz, a file descriptor otherwise."""
        handle = self._handles.get(file_index)
        if handle is None:
            with self._lock:
                handle = self._handles.get(file_index)
                if handle is None:
                    path = self.paths[file_index]
                    if path.endswith(".gz"):
                        with gzip.open(path, "rb") as f:
                            handle = f.read()
                    else:
                        handle = os.open(path, os.O_RDONLY)
                    self._handles[file_index] = handle
        return handle

    def _read(self, file_index: int, start: int, end: int) -> bytes:
        handle = self._handle(file_index)
        if isinstance(handle, bytes):
            return handle[start:end]
        return os.pread(handle, end - start, start)

    def _index(self, file_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) byte offsets of the non-blank lines of one file."""
        handle = self._handle(file_index)
        size = len(handle) if isinstance(handle, bytes) else os.fstat(handle).st_size
        newlines = []
        for offset in range(0, size, _SCAN_CHUNK):
            chunk = self._read(file_index, offset, min(size, offset + _SCAN_CHUNK))
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset)
        newlines_N = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        starts = np.concatenate([[0], newlines_N + 1]).astype(np.int64)
        ends = np.concatenate([newlines_N, [size]]).astype(np.int64)
        keep = ends - starts > 0
        starts, ends = starts[keep], ends[keep]
        one = ends - starts == 1  # a lone '\r' (CRLF files) is blank too
        if one.any():
            lone_cr = [self._read(file_index, s, e) == b"\r"
                       for s, e in zip(starts[one], ends[one])]
            drop = np.zeros(len(starts), bool)
            drop[np.flatnonzero(one)[lone_cr]] = True
            starts, ends = starts[~drop], ends[~drop]
        return starts, ends

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getitem__(self, index: int) -> dict:
        file_index = int(np.searchsorted(self._cum, index, side="right")) - 1
        j = index - int(self._cum[file_index])
        start, end = int(self._starts[file_index][j]), int(self._ends[file_index][j])
        where = f"{self.paths[file_index]} (record {j}, byte offset {start})"
        return _json_doc(self._read(file_index, start, end), self.text_field, where)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_lock=None, _handles={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


class TextFilesSource:
    """Plain-text files, one document each."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with open(self.paths[index], "rb") as f:
            return _raw_text_doc(f.read(), self.paths[index])

    def __repr__(self):
        return f"TextFilesSource({len(self.paths)} files)"


class ArrayRecordSource:
    """ArrayRecord files whose records are JSON objects or raw UTF-8 text (record 0 decides)."""

    def __init__(self, paths: list[str], text_field: str = "text"):
        import grain  # pylint: disable=g-import-not-at-top

        self.paths, self.text_field = list(paths), text_field
        self._records = grain.sources.ArrayRecordDataSource(self.paths)
        first = bytes(self._records[0]).lstrip() if len(self._records) else b""
        self.is_json = first.startswith(b"{") and "bad" not in _json_doc(first, text_field, "")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        where = f"{self.paths[0] if len(self.paths) == 1 else self.paths} (record {index})"
        raw = self._records[index]
        return _json_doc(raw, self.text_field, where) if self.is_json else _raw_text_doc(raw, where)

    def __repr__(self):
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


class TfdsSource:
    """A prepared TFDS dataset split through `tfds.data_source` (random access, no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str = "", text_field: str = "text"):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self.name, self.split, self.text_field = name, split, text_field
        self.data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        try:
            self._records = tfds.data_source(name, split=split, download=False,
                                             data_dir=os.path.expanduser(self.data_dir))
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"TFDS dataset '{name}' was not found (no builder of that name and "
                            f"nothing prepared under data_dir '{self.data_dir}')") from None
        except Exception as e:  # tfds raises assorted types for unprepared data and bad splits
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"TFDS dataset '{name}' split '{split}' cannot be read from data_dir "
                            f"'{self.data_dir}': {first_line}") from None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        where = f"tfds:{self.name}:{self.split} (record {index})"
        example = self._records[index]
        if not isinstance(example, dict) or self.text_field not in example:
            return _bad("missing_text", where)
        text, domain = example[self.text_field], example.get("domain")
        if isinstance(domain, bytes):
            domain = domain.decode("utf-8", "replace")
        if isinstance(text, (bytes, np.bytes_)):
            doc = _raw_text_doc(text, where)
            if "bad" not in doc:
                doc["domain"] = domain if isinstance(domain, str) else None
            return doc
        return _text_doc(text, domain, where) if isinstance(text, str) else _bad("missing_text",
                                                                                  where)

    def __repr__(self):
        return f"TfdsSource({self.name}:{self.split}, {len(self)} records)"


class ConcatSource:
    """Several sources read one after the other as one."""

    def __init__(self, parts: list):
        self.parts = parts
        self._cum = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getitem__(self, index: int) -> dict:
        part = int(np.searchsorted(self._cum, index, side="right")) - 1
        return self.parts[part][index - int(self._cum[part])]

    def __repr__(self):
        return f"ConcatSource({self.parts})"


# --------------------------------------------------------------------------- specs

@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One entry of a spec: what to read and its mixing weight."""
    target: str  # path, glob, 'bundled:train|eval' or 'tfds:...'
    weight: float = 1.0


def parse_spec(spec: str, *, default: str = "bundled:train", key: str = "sources") -> list[
        SourceEntry]:
    """Splits a spec string into entries; '' gives `default`. ConfigError names `key`."""
    entries = []
    for text in (spec.strip() or default).split(","):
        text = text.strip()
        target, weight = text, 1.0
        head, at, tail = text.rpartition("@")
        if at and re.fullmatch(r"[0-9.eE+-]+", tail.strip()):
            try:
                target, weight = head.strip(), float(tail)
            except ValueError:
                pass
        if not target:
            raise ConfigError(f"config key '{key}' has an empty entry in {spec!r}")
        if not weight > 0:
            raise ConfigError(f"config key '{key}': entry {text!r} has weight {weight}; "
                              "weights must be > 0")
        entries.append(SourceEntry(target, weight))
    return entries


def _split_tfds(target: str) -> tuple[str, str]:
    """'tfds:NAME[/CONFIG][:VERSION]:SPLIT' -> (NAME[/CONFIG][:VERSION], SPLIT)."""
    body, depth, cut = target[len("tfds:"):], 0, -1
    for i, ch in enumerate(body):
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth == 0:
            cut = i
    if cut <= 0 or cut == len(body) - 1:
        raise DataError(f"TFDS entry '{target}' must name a split: tfds:NAME[/CONFIG]:SPLIT")
    return body[:cut], body[cut + 1:]


def _expand_paths(target: str) -> list[str]:
    path = os.path.expanduser(target)
    if os.path.isdir(path):
        found = [os.path.join(root, name) for root, dirs, names in os.walk(path)
                 for name in names if not name.startswith(".")
                 if not any(part.startswith(".") for part in
                            os.path.relpath(root, path).split(os.sep) if part != ".")]
    elif any(ch in path for ch in "*?["):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(path):
        found = [path]
    else:
        raise DataError(f"data source '{target}' does not exist (no such file or folder)")
    if not found:
        raise DataError(f"data source '{target}' matches no file")
    return sorted(found)


def open_source(target: str, *, text_field: str = "text", tfds_data_dir: str = ""):
    """Opens one spec entry's target as a source (see the module docstring)."""
    if target.startswith("bundled:"):
        split = target[len("bundled:"):]
        path = os.path.join(BUNDLED_DIR, f"{split}.jsonl.gz")
        if split not in ("train", "eval") or not os.path.isfile(path):
            raise DataError(f"bundled corpus split '{target}' does not exist (valid: "
                            f"bundled:train, bundled:eval; looked for {path})")
        return JsonlSource([path], text_field="text")
    if target.startswith("tfds:"):
        name, split = _split_tfds(target)
        return TfdsSource(name, split, tfds_data_dir, text_field)
    paths = _expand_paths(target)
    groups = {"jsonl": [], "array_record": [], "text": []}
    for p in paths:
        if p.endswith(_JSONL_SUFFIXES):
            groups["jsonl"].append(p)
        elif ".array_record" in os.path.basename(p):
            groups["array_record"].append(p)
        else:
            groups["text"].append(p)
    parts = []
    if groups["jsonl"]:
        parts.append(JsonlSource(groups["jsonl"], text_field))
    if groups["array_record"]:
        parts.append(ArrayRecordSource(groups["array_record"], text_field))
    if groups["text"]:
        parts.append(TextFilesSource(groups["text"]))
    return parts[0] if len(parts) == 1 else ConcatSource(parts)


def read_documents(path_or_spec: str, text_field: str = "text", *, tfds_data_dir: str = "",
                   on_bad_record: str = "skip", max_documents: int | None = None) -> list[dict]:
    """Every document of a spec, in order, as `{'text': str, 'domain': str | None}` dicts.

    For evaluation and subset-selection tools: `''` is the bundled corpus's eval split, weights
    are ignored, entries are concatenated. Bad records are skipped and logged (or raise
    `DataError` with `on_bad_record='error'`); a spec with no document at all raises DataError.
    """
    docs, counts = [], {}
    for entry in parse_spec(path_or_spec, default="bundled:eval"):
        source = open_source(entry.target, text_field=text_field, tfds_data_dir=tfds_data_dir)
        for i in range(len(source)):
            if max_documents is not None and len(docs) >= max_documents:
                break
            doc = source[i]
            if "bad" not in doc:
                docs.append(doc)
            elif on_bad_record == "error":
                raise bad_record_error(doc)
            else:
                counts[doc["bad"]] = counts.get(doc["bad"], 0) + 1
    if counts:
        logging.warning("read_documents(%r): skipped bad records %s", path_or_spec, counts)
    if not docs:
        raise DataError(f"data source '{path_or_spec}' holds no valid document "
                        f"(bad records: {counts or 'none'})")
    return docs
