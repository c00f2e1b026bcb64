"""The training command (also installed as `emo-train`):

    python -m emo_jax.train --config=configs/tiny.py --workdir=DIR \\
        [--config.train.steps=200 ...] [--init_checkpoint=MODEL_OR_WORKDIR] \\
        [--trainable=subset.json [--train_router=rows|all|none]]

With --trainable (module fine-tuning, emo_jax/train/modules.py) only the subset's experts train
(and their router columns: --train_router=rows, the default; 'all': the whole router; 'none');
everything else stays bit-identical to --init_checkpoint, whose model shape (e.g. the expert
count of an extracted model) the run adopts.

Run the same command on every host of a pod (see launch/). Rerunning it resumes from the newest
checkpoint in DIR. A bad config key or value, a missing file, or a checkpoint of another model
shape, a --workdir that is a file ends the run with one line on stderr (exit status 2); a
preempted run (SIGTERM/SIGINT) saves a checkpoint and exits with 128 + the signal number (143
for SIGTERM, 130 for SIGINT); stopped that way before the first step, it saves nothing, says so
in one line and exits with the same status; a run stopped by too many non-finite steps exits
with 3; a checkpoint that cannot be written (disk full, permissions, quota) stops the run with
one line naming its path and the cause, exit status 4 (the newest complete checkpoint stays). A run that fails or is stopped before its first step leaves no workdir it created.

This file only parses flags; the work is `emo_jax.train.loop.train_and_evaluate`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from emo_jax import storage
from emo_jax.cli import fail, initialize_distributed, parse_flags, quiet_logging
from emo_jax.config import ConfigError, validate
from emo_jax.data.sources import DataError
from emo_jax.model_files import CHECKPOINTS, CheckpointError
from emo_jax.train.checkpoint import SaveError
from emo_jax.train.loop import StoppedBeforeStart, TrainingError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally with ':ARG' for get_config(ARG).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; a "
                               "rerun with the same workdir resumes.")
_INIT = flags.DEFINE_string("init_checkpoint", None, "Start from the parameters of this model "
                            "directory or training workdir (ignored when resuming).")
_TRAINABLE = flags.DEFINE_string("trainable", None, "Module fine-tuning: train only the experts "
                                 "of this subset file (python -m emo_jax.select).")
_TRAIN_ROUTER = flags.DEFINE_enum("train_router", None, ["rows", "all", "none"],
                                  "With --trainable: also train the subset's router columns "
                                  "('rows', the default), the whole router, or none of it.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    checkpoints = os.path.join(_WORKDIR.value, CHECKPOINTS)
    made = not storage.is_remote(checkpoints) and not os.path.lexists(checkpoints)
    try:
        _main()
    except BaseException:
        # A run that fails before its first checkpoint leaves no empty checkpoints/ folder in an
        # existing workdir (a workdir it created is removed whole: train_and_evaluate).
        if made and os.path.isdir(checkpoints) and not os.listdir(checkpoints):
            with contextlib.suppress(OSError):
                os.rmdir(checkpoints)
        raise


def _main():
    try:
        config = validate(_CONFIG.value)
        initialize_distributed()
        result = train_and_evaluate(config, _WORKDIR.value, init_checkpoint=_INIT.value,
                                    trainable=_TRAINABLE.value, train_router=_TRAIN_ROUTER.value)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as err:
        fail(str(err))
    except TrainingError as err:
        fail(str(err), status=3)
    except SaveError as err:
        fail(str(err), status=4)
    except StoppedBeforeStart as stop:
        fail(stop.message(), status=128 + stop.signum)
    if result["preempted"]:
        sys.exit(128 + signal.Signals[result["preempted"]].value)


def run():
    """Console-script entry point (`emo-train`)."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
