"""Plan a run before launching it (also installed as `emo-plan`):

    python -m emo_jax.plan --config=configs/emo_1b14b.py --topology=v5p-128 [--config.x=y ...]

Compiles the real train step ahead of time for a Cloud TPU slice (v4-N, v5p-N: N TensorCores;
v5e-N / v5litepod-N, v6e-N: N chips; or a shape such as v5p:2x2x4), or for this host's devices
without --topology, and prints per device: the arguments, temporaries and total memory against
the device's memory, the compile time and the model FLOPs per step (largest buffers when it does
not fit). Nothing is allocated, and a CPU host plans a pod; TPU targets need libtpu
(`pip install -e '.[tpu]'`). The last line is

    plan: fits=yes|no devices=N kind=KIND hbm_gb=H args_gb=A temp_gb=T total_gb=S compile_s=C

(sizes in GiB per device). Exit status: 0 when it fits, 2 when it does not; a bad flag, config
value or topology name is one `error:` line on stderr, also with status 2 (and no `plan:` line).

This file only parses flags; the work is `emo_jax.train.plan`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from emo_jax.cli import fail, parse_flags, quiet_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally with ':ARG' for get_config(ARG).",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Cloud TPU slice to plan for: v4-N, v5p-N (N TensorCores), v5e-N, "
    "v5litepod-N, v6e-N (N chips), or a shape such as v5p:2x2x4. Default: this host's devices.")
_HBM_GB = flags.DEFINE_float("hbm_gb", None, "Device memory to plan against, GiB per device "
                             "(default: the chip's HBM, or what the local device reports).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    if _HBM_GB.value is not None and _HBM_GB.value <= 0:
        fail(f"--hbm_gb must be > 0; got {_HBM_GB.value}")
    if _TOPOLOGY.value:
        # Compile-only TPU devices need no TPU backend here; keep jax off any local accelerator.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "2")
        # Compiling for a topology opens no TPU: several plans may run at once on one host.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from emo_jax.config import ConfigError, validate
    from emo_jax.train import plan as plan_lib

    try:
        config = validate(_CONFIG.value)
        if _TOPOLOGY.value:
            target = plan_lib.tpu_target(_TOPOLOGY.value, _HBM_GB.value)
        else:
            target = plan_lib.local_target(_HBM_GB.value)
        plan = plan_lib.make_plan(config, target)
    except (ConfigError, plan_lib.PlanError) as err:
        fail(str(err))
    for line in plan_lib.report_lines(plan):
        print(line, flush=True)
    sys.exit(0 if plan["fits"] else 2)


def run():
    """Console-script entry point (`emo-plan`)."""
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
