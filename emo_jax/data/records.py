"""Record readers: random-access sources of documents over JSONL, text files, ArrayRecord, TFDS.

Item `i` of every source is either a document `{'text': str, 'domain': str | None}` or a
bad-record marker `{'bad': REASON, 'where': 'PATH (record i)'}`, REASON one of BAD_REASONS:
'invalid_json', 'missing_text' (absent or not a string), 'empty' (only whitespace),
'not_utf8' (undecodable bytes, or lone surrogates from JSON escapes), 'corrupt_file' (a
compressed file whose stream is truncated or corrupt: a `.gz` JSONL file keeps every line that
decompressed completely; from the first incomplete line on, the rest of the file is one bad
record, since a broken compressed stream cannot be resynchronised; a `.gz` file that is not gzip
at all is one bad record). Sources parse lazily,
pickle without open handles (Grain worker processes reopen files), and never download.
Which source reads which path is decided by `emo_jax.data.sources.open_source`.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import zlib

import grain
import numpy as np

from emo_jax.config import ConfigError

BAD_REASONS = ("invalid_json", "missing_text", "empty", "not_utf8", "corrupt_file")
_SCAN_CHUNK = 1 << 26  # bytes scanned at once when indexing JSONL lines
_GZIP_CHUNK = 1 << 20  # decompressed bytes read at once; a corrupt stream loses at most this


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


def _gunzip(path: str) -> tuple[bytes, str | None]:
    """(the decompressed bytes, None), or (the bytes read before the stream broke, why)."""
    parts = []
    try:
        with gzip.open(path, "rb") as f:
            while True:
                part = f.read1(_GZIP_CHUNK)
                if not part:
                    break
                parts.append(part)
    except EOFError:
        return b"".join(parts), "the gzip stream is truncated"
    except gzip.BadGzipFile as err:
        if not parts and "Not a gzipped file" in str(err):
            return b"", "not gzip data (a plain JSONL file must not end in .gz)"
        return b"".join(parts), f"corrupt gzip data ({err})"
    except zlib.error as err:
        return b"".join(parts), f"corrupt gzip data ({err})"
    except OSError as err:
        raise DataError(f"data file '{path}' cannot be read: {err.strerror or err}") from None
    return b"".join(parts), None


# --------------------------------------------------------------------------- sources

class JsonlSource:
    """JSON Lines files (optionally gzipped) with a byte-offset index of their non-blank lines."""

    def __init__(self, paths: list[str], text_field: str = "text"):
        self.paths, self.text_field = list(paths), text_field
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._damage: dict[int, str] = {}  # file index -> why its compressed stream broke
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
                        handle, why = _gunzip(path)
                        if why is not None:
                            self._damage.setdefault(file_index, why)
                    else:
                        try:
                            handle = os.open(path, os.O_RDONLY)
                        except OSError as err:
                            raise DataError(f"data file '{path}' cannot be read: "
                                            f"{err.strerror or err}") from None
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
        if file_index in self._damage:  # the unterminated tail and the rest: one bad record
            tail = int(newlines_N[-1]) + 1 if len(newlines_N) else 0
            self._damage[file_index] = (f"line {len(newlines_N) + 1}, byte offset {tail} of the "
                                        f"decompressed data: {self._damage[file_index]}")
            keep = ends < tail  # lines that end in a newline of the readable part
            starts = np.append(starts[keep], tail).astype(np.int64)
            ends = np.append(ends[keep], -1).astype(np.int64)
        return starts, ends

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getitem__(self, index: int) -> dict:
        file_index = int(np.searchsorted(self._cum, index, side="right")) - 1
        j = index - int(self._cum[file_index])
        start, end = int(self._starts[file_index][j]), int(self._ends[file_index][j])
        if end < 0:  # where a damaged compressed file stopped decompressing
            return _bad("corrupt_file", f"{self.paths[file_index]} (record {j}, "
                        f"{self._damage[file_index]}; the rest of the file is unreadable)")
        where = f"{self.paths[file_index]} (record {j}, byte offset {start})"
        return _json_doc(self._read(file_index, start, end), self.text_field, where)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_lock=None, _handles={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for handle in getattr(self, "_handles", {}).values():
            if isinstance(handle, int):
                os.close(handle)

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
        self.paths, self.text_field = list(paths), text_field
        self._records = grain.sources.ArrayRecordDataSource(self.paths)
        first = bytes(self._records[0]).lstrip() if len(self._records) else b""
        self.is_json = first.startswith(b"{") and "bad" not in _json_doc(first, text_field, "")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        files = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} and others"
        where = f"{files} (record {index})"
        raw = self._records[index]
        return _json_doc(raw, self.text_field, where) if self.is_json else _raw_text_doc(raw, where)

    def __repr__(self):
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


class TfdsSource:
    """A prepared TFDS dataset split through `tfds.data_source` (random access, no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str = "", text_field: str = "text"):
        # Deferred: tensorflow_datasets is heavy to import and only TFDS sources need it.
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
