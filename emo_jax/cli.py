"""Helpers shared by the command-line entry points (`python -m emo_jax.<verb>`): absl flag
parsing that turns user mistakes into one line, multi-process initialisation, quiet logging.

Nothing here parses a flag of its own or imports jax at import time.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging


def fail(message: str, status: int = 2):
    """One line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _unknown_key_message(argv) -> str | None:
    """Names the first --config.KEY override that the config schema does not have."""
    from emo_jax.config import default_config

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
    from emo_jax import parallel

    parallel.initialize_distributed()


def quiet_logging():
    """WARNING and above unless --verbosity/-v was given (Orbax logs every file at INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
