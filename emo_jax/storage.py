"""Paths on local disk or on object storage (gs://, s3://), through one abstraction.

Everything emo_jax reads or writes outside Orbax and TensorStore (which take gs:// paths
themselves) goes through these helpers: workdirs, config.json, metrics.jsonl, model
directories, subset files, reports, request logs, data files. Remote paths use `etils.epath`
(Orbax's own path library; gs:// needs gcsfs: `pip install emo_jax[gcs]`); local paths keep the
plain os calls they always used, so local behaviour is unchanged.

Object stores differ from a disk in what matters here:
  * there is no rename: a directory cannot appear atomically. Completed model directories are
    recognised by their `metadata.json`, written last (`model_files.save_params`); Orbax marks
    complete checkpoints with `commit_success.txt`;
  * a single object appears whole or not at all, so writing one file is atomic by itself
    (`write_text`), and there is no append (metrics.jsonl is rewritten whole, see metrics.py);
  * listings may be cached by gcsfs within a process: `listdir` and `exists` here ask the
    store afresh.

Credentials come from the environment, as for gcsfs and TensorStore (Application Default
Credentials: the VM's service account on a TPU VM, `gcloud auth application-default login` or
GOOGLE_APPLICATION_CREDENTIALS elsewhere); STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL
point both at a local emulator (the tests do).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path) -> bool:
    """True for an object-store URL (gs://bucket/..., s3://bucket/...)."""
    return str(path).startswith(REMOTE_SCHEMES)


def absolute(path) -> str:
    """An absolute local path, or the URL itself (os.path.abspath would mangle 'gs://')."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def dirname(path) -> str:
    path = absolute(path)
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    return posixpath.basename(absolute(path))


def epath_of(path):
    """The `etils.epath.Path` of `path` (for code that wants a Path object)."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    return epath.Path(absolute(path))


class _QuietBucketProbe:
    """Drops gcsfs's warning that it could not determine a bucket's type (hierarchical or
    flat) without credentials that may read the bucket's layout, as against a local emulator:
    it goes on with the flat-namespace client, which is what emo_jax needs."""

    def filter(self, record) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


def _fs(path):
    """The fsspec file system of a remote path (gcsfs for gs://, s3fs for s3://)."""
    from etils.epath import backend  # pylint: disable=g-import-not-at-top

    global _QUIETED
    if not _QUIETED:
        logging.getLogger("gcsfs").addFilter(_QuietBucketProbe())
        _QUIETED = True
    return backend.fsspec_backend.fs(path)


_QUIETED = False


def _fresh(path):
    """Forgets gcsfs's cached listings of `path` and its parent (another process, or Orbax,
    may have written there since)."""
    fs = _fs(path)
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return fs


def exists(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.exists(path)
    return _fresh(path).exists(path)


def isdir(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.isdir(path)
    return _fresh(path).isdir(path)


def isfile(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.isfile(path)
    return _fresh(path).isfile(path)


def listdir(path) -> list[str]:
    """Names in a directory (OSError / FileNotFoundError when it does not exist)."""
    path = absolute(path)
    if not is_remote(path):
        return os.listdir(path)
    fs = _fresh(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"no such directory: {path}")
    return sorted({posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
                  - {""})


def makedirs(path):
    """Creates a directory and its parents (on object stores there is nothing to create)."""
    path = absolute(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open_file(path, mode: str = "r", encoding: str | None = "utf-8"):
    """open() for local paths and URLs ('r', 'rb', 'w', 'wb'; no append on object stores)."""
    path = absolute(path)
    if "b" in mode:
        encoding = None
    if not is_remote(path):
        return open(path, mode, encoding=encoding)  # pylint: disable=unspecified-encoding
    if "a" in mode or "+" in mode:
        raise ValueError(f"mode {mode!r} is not supported on object storage ({path})")
    if "b" in mode:
        return _fs(path).open(path, mode)
    return _fs(path).open(path, mode.replace("t", ""), encoding=encoding)


def read_text(path) -> str:
    with open_file(path, "r") as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def write_text(path, text: str):
    """Writes a whole file atomically: locally through a temporary sibling renamed into place;
    on object storage one object upload, which appears whole or not at all."""
    path = absolute(path)
    if is_remote(path):
        _fs(path).pipe_file(path, text.encode("utf-8"))
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove(path):
    path = absolute(path)
    if is_remote(path):
        _fresh(path).rm(path)
    else:
        os.remove(path)


def rmtree(path, ignore_errors: bool = False):
    path = absolute(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        fs = _fresh(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001
        if not ignore_errors:
            raise


def copytree(src, dst, last: str | None = None):
    """Copies a directory tree (on object storage server-side, object by object; the file named
    `last` at the top of the tree, e.g. a completion mark, is copied after all the others)."""
    src, dst = absolute(src), absolute(dst)
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"cannot copy between local and remote storage ({src} -> {dst})")
    if not is_remote(src):
        shutil.copytree(src, dst)
        return
    fs = _fresh(src)
    scheme, bare = src.split("://", 1)
    names = sorted(posixpath.relpath(n.split("://", 1)[-1], bare) for n in fs.find(src))
    if last in names:
        names = [n for n in names if n != last] + [last]
    for rel in names:
        fs.copy(f"{scheme}://{bare}/{rel}", posixpath.join(dst, rel))
    fs.invalidate_cache(dst)


def copy_file(src, dst):
    """Copies one file, local or remote to local or remote."""
    src, dst = absolute(src), absolute(dst)
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
    elif is_remote(src) and is_remote(dst):
        _fs(src).copy(src, dst)
    elif is_remote(dst):
        _fs(dst).put_file(src, dst)
    else:
        _fs(src).get_file(src, dst)


def local_copy(path, cache_dir: str | None = None) -> str:
    """A local path holding the file `path` (itself when local; a remote one is downloaded
    once into a temporary cache): for libraries that read only local files (SentencePiece,
    Hugging Face tokenizers)."""
    path = absolute(path)
    if not is_remote(path):
        return path
    import hashlib  # pylint: disable=g-import-not-at-top

    root = cache_dir or os.path.join(tempfile.gettempdir(), f"emo_jax_remote_{os.getuid()}")
    info = _fresh(path).info(path)  # a changed object (new generation) is fetched again
    version = info.get("generation") or info.get("ETag") or info.get("etag") or ""
    key = f"{path}\n{version}\n{info.get('size')}"
    local = os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16],
                         posixpath.basename(path))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        copy_file(path, local + ".tmp")
        os.replace(local + ".tmp", local)
    return local


def upload_tree(local: str, remote, last: str | None = None):
    """Copies a local directory tree into `remote` (local or an object-store URL); the file
    named `last` at the top of the tree (a completion mark) goes after all the others."""
    names = []
    for root, _, files in os.walk(local):
        names += [os.path.relpath(os.path.join(root, n), local) for n in files]
    names.sort()
    if last in names:
        names = [n for n in names if n != last] + [last]
    for rel in names:
        target = join(remote, *rel.split(os.sep))
        if not is_remote(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy_file(os.path.join(local, rel), target)


def glob(pattern: str) -> list[str]:
    """The URLs matching a glob pattern on object storage."""
    fs = _fresh(pattern.split("*")[0].rsplit("/", 1)[0])
    scheme = pattern.split("://", 1)[0]
    return [p if "://" in p else f"{scheme}://{p}" for p in fs.glob(pattern)]


def find(path: str) -> list[str]:
    """Every file under a directory on object storage (URLs)."""
    path = absolute(path)
    scheme = path.split("://", 1)[0]
    return [p if "://" in p else f"{scheme}://{p}" for p in _fresh(path).find(path)]
