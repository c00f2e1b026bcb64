"""Put expert modules from several checkpoints into one (also `emo-compose`):

    python -m emo_jax.compose --base=DIR --take=DIR_A:subset_a.json \\
        [--take=DIR_B:subset_b.json ...] --out=DIR_C

Starts from every parameter of the base checkpoint and copies in, per layer, the experts (and
their router columns) that each subset file names, from that take's checkpoint: e.g. a base
model plus a legal module and a code module fine-tuned separately with
`python -m emo_jax.train --trainable=...`. The sources must have the base's architecture, and
two takes may not claim the same expert of a layer (both are refused with one line naming the
keys, or the layer and the expert). DIR_C is a model directory (written atomically, never over
an existing one) that every tool reads. Details: emo_jax/modular/transplant.py.
"""

from __future__ import annotations


from absl import app, flags

from emo_jax import storage
from emo_jax.cli import fail, parse_flags, quiet_logging
from emo_jax.config import ConfigError
from emo_jax.model_files import CheckpointError
from emo_jax.modular import subset as subset_lib, transplant

_BASE = flags.DEFINE_string("base", None, "Base checkpoint: training workdir, "
                            "checkpoints/<step> directory or model directory.")
_TAKE = flags.DEFINE_multi_string("take", [], "SOURCE_CHECKPOINT:SUBSET_FILE: take the subset's "
                                  "experts from that checkpoint (repeatable).")
_OUT = flags.DEFINE_string("out", None, "Model directory to write (must not exist).")


def parse_take(value: str) -> tuple[str, str]:
    """'DIR:subset.json' -> (DIR, subset.json); the last ':' separates them."""
    if ":" not in value:
        fail(f"--take={value}: expected SOURCE_CHECKPOINT:SUBSET_FILE")
    path, subset = value.rsplit(":", 1)
    if not path or not subset:
        fail(f"--take={value}: expected SOURCE_CHECKPOINT:SUBSET_FILE")
    return path, subset


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    if not _TAKE.value:
        fail("give at least one --take=SOURCE_CHECKPOINT:SUBSET_FILE")
    pairs = [parse_take(v) for v in _TAKE.value]
    try:
        if storage.exists(_OUT.value):
            raise CheckpointError(f"--out={_OUT.value} exists; choose a new directory")
        for path, _ in pairs + [(_BASE.value, None)]:
            if not storage.exists(path):
                raise CheckpointError(f"checkpoint {path} does not exist")
        takes = [(path, subset_lib.load(s)) for path, s in pairs]
        names = [f"--take={path}:{s}" for path, s in pairs]
        report = transplant.compose(_BASE.value, takes, _OUT.value, names=names)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    print(transplant.format_report(report))
    print(f"wrote {storage.absolute(_OUT.value)}")


def run():
    """Console-script entry point (`emo-compose`)."""
    flags.mark_flags_as_required(["base", "out"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
