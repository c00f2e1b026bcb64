"""`launch/cpu_multiprocess.sh 2`: two JAX processes on 127.0.0.1 (4 CPU devices each) train the
tiny config and checkpoint; SIGTERM to one of them stops both at the same step with a
checkpoint (JAX's preemption service); one-process runs (8 devices) then resume the pod's
checkpoints, reading the same global batches (the data stream keeps the pod's two shards)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import train_helpers as th


def _process(launcher: subprocess.Popen, process_id: int):
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if (child.environ().get("JAX_PROCESS_ID") == str(process_id)
                    and "emo_jax.train" in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _launch_pod(workdir, log_dir, *, preempt_after_step=None):
    """Runs the launcher; optionally SIGTERMs process 1 alone once `preempt_after_step` is
    logged. Returns the launcher's exit status."""
    env = th.cli_env(devices=None)
    env.update(PYTHON=sys.executable, LOG_DIR=str(log_dir))
    launcher = subprocess.Popen(
        ["bash", os.path.join(th.REPO, "launch", "cpu_multiprocess.sh"), "2", *th.BASE_ARGS,
         f"--workdir={workdir}"], cwd=th.REPO, env=env, start_new_session=True)
    try:
        if preempt_after_step is not None:
            deadline = time.time() + 600
            while max(th.step_records(workdir), default=0) < preempt_after_step:
                assert launcher.poll() is None, "the pod stopped early"
                assert time.time() < deadline, "the pod made no progress"
                time.sleep(0.02)
            _process(launcher, 1).send_signal(signal.SIGTERM)
        return launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.slow
def test_cpu_multiprocess_launch_preempt_and_resume(tmp_path):
    workdir = tmp_path / "pod"
    rc = _launch_pod(workdir, tmp_path / "logs1", preempt_after_step=1)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs1").iterdir()))
    # One host preempted: both stop at the same step, with one checkpoint of it.
    assert rc == 128 + signal.SIGTERM, logs
    assert logs.count("SIGTERM received: saved checkpoint") == 1  # process 0 reports
    stopped = max(th.step_records(workdir))
    assert stopped < th.STEPS and (workdir / "checkpoints" / str(stopped)).is_dir()
    preempted = tmp_path / "preempted"
    shutil.copytree(workdir, preempted)

    # The same command resumes the pod and finishes.
    assert _launch_pod(workdir, tmp_path / "logs2") == 0
    pod = th.step_records(workdir)
    assert sorted(pod) == list(range(1, th.STEPS + 1))

    # One process resumes the pod's preemption checkpoint: the same global batches (the data
    # keeps the pod's two shards), so the same losses up to reduction order.
    out = th.run_train(preempted)
    assert f"resumed from checkpoint {stopped}" in out.stdout
    one = th.step_records(preempted)
    assert sorted(one) == list(range(1, th.STEPS + 1))
    for step in range(stopped + 1, th.STEPS + 1):
        np.testing.assert_allclose(one[step]["loss"], pod[step]["loss"], rtol=1e-5)
