"""`launch/cpu_multiprocess.sh 2`: two JAX processes on 127.0.0.1 (4 CPU devices each) train the
tiny config and checkpoint; a one-process run (8 devices) resumes the checkpoint and reads the
same global batches (the data stream keeps the first launch's two shards)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th


@pytest.mark.slow
def test_cpu_multiprocess_launch_then_one_process_resume(tmp_path):
    workdir = tmp_path / "pod"
    env = th.cli_env(devices=None)
    env.update(PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        ["bash", os.path.join(th.REPO, "launch", "cpu_multiprocess.sh"), "2", *th.BASE_ARGS,
         f"--workdir={workdir}"], cwd=th.REPO, env=env, text=True, capture_output=True,
        timeout=900)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))
    assert proc.returncode == 0, logs
    pod = th.step_records(workdir)
    assert sorted(pod) == list(range(1, th.STEPS + 1))
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(th.EVERY), str(th.STEPS)]

    resumed = tmp_path / "one_process"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(th.STEPS))
    out = th.run_train(resumed)
    assert f"resumed from checkpoint {th.EVERY}" in out.stdout
    one = th.step_records(resumed)
    for step in range(th.EVERY + 1, th.STEPS + 1):
        np.testing.assert_allclose(one[step]["loss"], pod[step]["loss"], rtol=1e-5)
