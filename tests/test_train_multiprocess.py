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
            if child.environ().get("JAX_PROCESS_ID") == str(process_id) and "python" in child.name():
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_cpu_multiprocess_launch_preempt_and_one_process_resume(tmp_path):
    workdir = tmp_path / "pod"
    env = th.cli_env(devices=None)
    env.update(PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
    launcher = subprocess.Popen(
        ["bash", os.path.join(th.REPO, "launch", "cpu_multiprocess.sh"), "2", *th.BASE_ARGS,
         f"--workdir={workdir}"], cwd=th.REPO, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while th.EVERY + 1 not in th.step_records(workdir):
            assert launcher.poll() is None, "the pod stopped early"
            assert time.time() < deadline, "the pod made no progress"
            time.sleep(0.05)
        second = _process(launcher, 1)
        if second is not None:
            second.send_signal(signal.SIGTERM)  # one host preempted: both must stop together
        rc = launcher.wait(timeout=600)
        print("pod exit status", rc)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))
    pod = th.step_records(workdir)
    stopped = max(pod)
    if rc == 0:  # the signal came after the last step
        assert stopped == th.STEPS
    else:
        assert rc == 128 + signal.SIGTERM, logs
        assert logs.count("SIGTERM received: saved checkpoint") == 1  # process 0 reports
        assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert (workdir / "checkpoints" / str(th.EVERY)).is_dir()

    # One process resumes the pod's checkpoint of step EVERY: the same global batches, so the
    # same losses as the pod (up to reduction order across the 8 devices).
    replay = tmp_path / "replay"
    shutil.copytree(workdir, replay)
    for name in os.listdir(replay / "checkpoints"):
        if int(name) > th.EVERY:
            shutil.rmtree(replay / "checkpoints" / name)
    out = th.run_train(replay)
    assert f"resumed from checkpoint {th.EVERY}" in out.stdout
    one = th.step_records(replay)
    assert sorted(one) == list(range(1, th.STEPS + 1))
    for step in range(th.EVERY + 1, stopped + 1):
        np.testing.assert_allclose(one[step]["loss"], pod[step]["loss"], rtol=1e-5)
    # And the pod's own latest checkpoint resumes in one process to the end.
    if stopped < th.STEPS:
        th.run_train(workdir)
        assert max(th.step_records(workdir)) == th.STEPS
