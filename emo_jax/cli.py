"""Helpers shared by the command-line entry points (`python -m emo_jax.<verb>`): absl flag
parsing that turns user mistakes into one line, multi-process initialisation, quiet logging.

Nothing here parses a flag of its own or imports jax at import time: an entry point may set
JAX_* environment variables after importing this module (emo_jax/plan.py), and jax reads
them when it is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

from absl import flags, logging

from emo_jax.config import default_config


def fail(message: str, status: int = 2):
    """One line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _unknown_key_message(argv) -> str | None:
    """Names the first --config.KEY override that the config schema does not have."""
    known = default_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, walked = known, []
        for part in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(walked)
                valid = ", ".join(sorted(keys)) if keys else "(none: it is a value)"
                return (f"unknown config key '{dotted}' (from {arg.split('=', 1)[0]}); valid keys"
                        f" of '{where or 'config'}': {valid}")
            node, walked = node[part], walked + [part]
    return None


def _config_file_problem(argv) -> str | None:
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg[len("--config="):].split(":", 1)[0]
            if not os.path.isfile(path):
                return f"config file '{path}' does not exist (--config={path})"
    return None


def parse_flags(argv):
    """absl flag parsing that turns every user mistake into one line (exit status 2)."""
    problem = _config_file_problem(argv)
    if problem:
        fail(problem)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(str(err).splitlines()[0] if "Error whilst parsing config file" not in str(err)
             else _config_code_error(str(err)))
    except (AttributeError, KeyError) as err:
        fail(_unknown_key_message(argv) or f"bad config override: {err}")
    except SyntaxError as err:
        fail(f"config file {err.filename} line {err.lineno}: syntax error: {err.msg}")


def _config_code_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{lines[0].split(':', 1)[0]}: config file raised {lines[-1]}"


def initialize_distributed():
    """Multi-process JAX when the environment describes a job (SLURM, a TPU pod, or
    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID as launch/ scripts set)."""
    # Deferred: emo_jax.parallel imports jax (module docstring).
    from emo_jax import parallel  # pylint: disable=g-import-not-at-top

    parallel.initialize_distributed()


def quiet_logging():
    """WARNING and above unless --verbosity/-v was given (Orbax logs every file at INFO).

    Without --verbosity, Orbax's own log records (the tracebacks it logs from its background
    threads when a save or restore fails) are dropped too, as are the "Event loop is closed"
    tracebacks that TensorStore callbacks print after a failed Orbax operation: every such
    failure reaches emo_jax as an exception and is reported in one line. So are the "Exception
    ignored in: <coroutine ...>" tracebacks of Orbax's other array reads when one read of an
    unreadable checkpoint fails (the restore is abandoned, and its pending reads are collected
    later). Pass --verbosity=0 (or higher) to see them.
    """
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    import logging as std_logging  # pylint: disable=g-import-not-at-top

    class _NoOrbax(std_logging.Filter):
        def filter(self, record):
            return (f"{os.sep}orbax{os.sep}" not in (record.pathname or "")
                    and record.name != "asyncio")  # futures of a failed Orbax save

    std_logging.getLogger("asyncio").addFilter(_NoOrbax())
    for handler in [logging.get_absl_handler(), *std_logging.getLogger().handlers]:
        if not any(isinstance(f, _NoOrbax) for f in handler.filters):
            handler.addFilter(_NoOrbax())
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return  # an asyncio callback of a failed Orbax operation, already reported
        previous(kind, value, tb)

    sys.excepthook = excepthook
    previous_unraisable = sys.unraisablehook

    def unraisablehook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        where = getattr(unraisable.object, "cr_code", None)
        if where is not None and f"{os.sep}orbax{os.sep}" in where.co_filename:
            return  # a pending read of an abandoned Orbax restore, already reported
        previous_unraisable(unraisable)

    sys.unraisablehook = unraisablehook


def refuse_existing_output(path: str, flag: str = "--out", *, overwrite: bool = False,
                           directory: bool = False):
    """One line (exit status 2) unless `path` may be written: it does not exist, or (`directory`)
    is an empty folder, or `overwrite` (the --overwrite flag) is set and it is of the right kind.
    """
    from emo_jax import storage  # pylint: disable=g-import-not-at-top

    if storage.is_remote(path):
        if not storage.exists(path):
            return
        if directory and not storage.isdir(path):
            fail(f"{flag}={path} is a file; give a directory (new, or one to replace with "
                 "--overwrite)")
        if not directory and storage.isdir(path):
            fail(f"{flag}={path} is a directory; give a file name")
        if not overwrite:
            fail(f"{flag}={path} exists; pass --overwrite to replace it, or choose another "
                 f"{'directory' if directory else 'file'}")
        return
    if not os.path.lexists(path):
        return
    if directory and not os.path.isdir(path):
        fail(f"{flag}={path} is a file; give a directory (new, or one to replace with "
             "--overwrite)")
    if not directory and os.path.isdir(path):
        fail(f"{flag}={path} is a directory; give a file name")
    if directory and not os.listdir(path):
        return
    if not overwrite:
        fail(f"{flag}={path} exists; pass --overwrite to replace it, or choose another "
             f"{'directory' if directory else 'file'}")


def write_text_atomically(path: str, text: str):
    """Writes `path` whole or not at all (`storage.write_text`): locally through a temporary
    sibling renamed into place, on object storage (gs://) as one object upload."""
    from emo_jax import storage  # pylint: disable=g-import-not-at-top

    storage.write_text(path, text)


@contextlib.contextmanager
def directory_written_atomically(path: str):
    """Yields a hidden temporary sibling of `path` to write into; on success it replaces `path`
    (an old one is removed only after the new one is in place); on failure it is removed.

    On object storage (no rename) the yielded folder is a local temporary one, uploaded into
    `path` once complete (an old `path` is removed first, after the new files were written)."""
    from emo_jax import storage  # pylint: disable=g-import-not-at-top

    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="emo_jax_out_") as work:
            yield work
            staging = storage.absolute(path) + ".partial"
            storage.rmtree(staging, ignore_errors=True)
            storage.upload_tree(work, staging)
            storage.rmtree(path, ignore_errors=True)
            storage.copytree(staging, path)
            storage.rmtree(staging, ignore_errors=True)
        return
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.writing-", dir=parent)
    try:
        yield work
        old = None
        if os.path.isdir(final) and os.listdir(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.replace(final, os.path.join(old, "previous"))
        elif os.path.isdir(final):
            os.rmdir(final)
        try:
            os.replace(work, final)
        except BaseException:
            if old is not None:  # put the old one back
                os.replace(os.path.join(old, "previous"), final)
                os.rmdir(old)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

