"""Document sources: JSONL, text files, ArrayRecord, TFDS and the bundled corpus, by spec string.

`open_source(entry)` returns a random-access source (records.py) whose items are documents
`{'text': str, 'domain': str | None}` or bad-record markers, which the pipeline counts and
drops (or raises on, with `data.on_bad_record='error'`).

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
import os
import re

from absl import logging

from emo_jax import storage
from emo_jax.config import ConfigError
from emo_jax.data.records import (BAD_REASONS, ArrayRecordSource, ConcatSource, DataError,
                                  JsonlSource, TextFilesSource, TfdsSource, bad_record_error)

__all__ = ["BAD_REASONS", "BUNDLED_DIR", "DataError", "SourceEntry", "bad_record_error",
           "open_source", "parse_spec", "read_documents"]

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One entry of a spec: what to read and its mixing weight."""
    target: str  # path, glob, 'bundled:train|eval' or 'tfds:...'
    weight: float = 1.0


def parse_spec(spec: str, *, default: str = "bundled:train",
               key: str = "sources") -> list[SourceEntry]:
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


def _remote_paths(target: str) -> list[str]:
    """Local copies of the files of an object-store target (file, folder or glob): the readers
    index files by byte offset (and ArrayRecord reads local files), so each file is downloaded
    once into a local cache (storage.local_copy) and read from there."""
    try:
        if any(ch in target for ch in "*?["):
            found = [p for p in storage.glob(target) if storage.isfile(p)]
        elif storage.isdir(target):
            found = [p for p in storage.find(target)
                     if not any(part.startswith(".") for part in p[len(target):].split("/"))]
        elif storage.isfile(target):
            found = [target]
        else:
            raise DataError(f"data source '{target}' does not exist (no such file or folder)")
    except OSError as err:
        raise DataError(f"data source '{target}' cannot be read: {err}") from None
    if not found:
        raise DataError(f"data source '{target}' matches no file")
    return [storage.local_copy(p) for p in sorted(found)]


def _expand_paths(target: str) -> list[str]:
    if storage.is_remote(target):
        return _remote_paths(target)
    path = os.path.expanduser(target)
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, name) for name in names if not name.startswith(".")]
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
    docs, counts, latest = [], {}, None
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
                latest = latest or f"{doc['bad']} at {doc['where']}"
    if not docs:
        raise DataError(f"data source '{path_or_spec}' holds no valid document "
                        f"(bad records: {counts or 'none'}" + (f"; first: {latest})" if latest
                                                               else ")"))
    if counts:
        logging.warning("data source %r: skipped %d bad records %s; first: %s", path_or_spec,
                        sum(counts.values()), counts, latest)
    return docs
