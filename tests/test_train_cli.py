"""End to end through `python -m emo_jax.train` in subprocesses: exact resume after SIGKILL and
SIGTERM, resume on another mesh, non-finite steps, and the README quick start. (Damaged
checkpoints, another model shape and bad config values are cases of tests/test_bad_inputs.py.)"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


def _wait_for(predicate, proc, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _assert_same_run(reference, workdir):
    ref, got = th.losses(reference), th.losses(workdir)
    assert sorted(got) == list(range(1, th.STEPS + 1))
    for step in ref:  # bit for bit: same floats, same data checksums
        assert got[step] == ref[step], (step, got[step], ref[step])


def test_reference_run_learns_and_checkpoints(reference):
    recs = th.step_records(reference)
    assert sorted(recs) == list(range(1, th.STEPS + 1))
    assert recs[th.STEPS]["loss"] < recs[1]["loss"]
    ckpts = sorted(int(n) for n in os.listdir(os.path.join(reference, "checkpoints")))
    assert ckpts == [th.EVERY, th.STEPS]
    for key in ("cross_entropy", "balance_loss", "router_z_loss", "output_z_loss",
                "learning_rate", "grad_norm", "max_load_ratio", "unused_experts",
                "mean_pool_size", "dropped_tokens", "tokens_per_s", "tflops_per_device"):
        assert key in recs[th.STEPS], key
    assert len(recs[th.STEPS]["max_load_ratio"]) == 2  # one per layer
    assert any("eval_loss" in r for r in th.records(reference))
    assert os.listdir(os.path.join(reference, "tensorboard"))
    with open(os.path.join(reference, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == th.STEPS


@pytest.mark.slow
def test_exact_resume_after_sigkill(reference, tmp_path):
    workdir = tmp_path / "killed"
    proc = th.start_train(workdir, log_path=tmp_path / "log")
    _wait_for(lambda: (workdir / "checkpoints" / str(th.EVERY)).is_dir(), proc,
              what=f"checkpoint {th.EVERY}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "checkpoints" / str(th.STEPS)).exists(), "run finished before the kill"
    th.run_train(workdir)
    resumed = [r for r in th.records(workdir) if r.get("event") == "resume"]
    assert resumed and resumed[0]["step"] >= th.EVERY
    _assert_same_run(reference, workdir)


@pytest.mark.slow
def test_exact_resume_after_sigterm_at_a_random_moment(reference, tmp_path):
    workdir = tmp_path / "terminated"
    delay = random.Random().uniform(0.0, 0.6)
    proc = th.start_train(workdir, log_path=tmp_path / "log")
    _wait_for(lambda: th.step_records(workdir), proc, what="the first step")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    if rc == 0:  # the signal came after the last step: nothing to resume
        pytest.skip(f"SIGTERM {delay:.2f}s after step 1 came after the end of the run")
    assert rc == 128 + signal.SIGTERM, log
    assert "SIGTERM received: saved checkpoint" in log
    stopped = [r for r in th.records(workdir) if r.get("event") == "preempted"][0]["step"]
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    th.run_train(workdir)
    _assert_same_run(reference, workdir)


@pytest.mark.slow
def test_resume_on_a_different_mesh(reference, tmp_path):
    workdir = tmp_path / "remesh"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(th.STEPS))
    th.run_train(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    ref, got = th.step_records(reference), th.step_records(workdir)
    for step in range(th.EVERY + 1, th.STEPS + 1):
        assert got[step]["data_crc32"] == ref[step]["data_crc32"]
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=2e-5)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    workdir = tmp_path / "nan"
    proc = th.run_train(workdir, "--config.train.inject_nonfinite_step=3",
                        f"--config.train.steps={th.EVERY + 1}")
    recs = th.step_records(workdir)
    assert recs[3]["step_ok"] == 0.0 and recs[3]["skipped_steps"] == 1
    assert recs[2]["skipped_steps"] == 0 and recs[2]["step_ok"] == 1.0
    assert all(recs[s]["step_ok"] == 1.0 and np.isfinite(recs[s]["loss"]) for s in (4, 5))
    assert recs[5]["skipped_steps"] == 1
    assert "step 3: non-finite loss or gradient; step skipped" in proc.stdout
    # Too many in a row: max_bad_steps=1 stops at step 3, the checkpoint of step 2 intact.
    stop = tmp_path / "stop"
    proc = th.run_train(stop, "--config.train.inject_nonfinite_step=3",
                        f"--config.train.steps={th.EVERY + 1}", "--config.train.max_bad_steps=1",
                        "--config.checkpoint.every=2", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "max_bad_steps" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(stop / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_readme_quick_start_train_command(tmp_path):
    with open(os.path.join(th.REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    commands = re.findall(r"^(?:\$ )?(python3 -m venv .*)$", readme, flags=re.M)
    train = [c for c in commands if "emo_jax.train" in c]
    assert len(train) == 1, commands
    step = train[0].split("&&")[-1].strip().split()  # the part after the installs
    assert step[:3] == ["python", "-m", "emo_jax.train"]
    args = [a for a in step[3:] if not a.startswith("--workdir")]
    workdir = tmp_path / "quick"
    # Same compiled shapes as the reference run, so the shared compilation cache serves it.
    proc = subprocess.run([sys.executable, "-m", "emo_jax.train", *args, f"--workdir={workdir}",
                           f"--config.train.steps={th.STEPS}"], cwd=th.REPO, env=th.cli_env(),
                          text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    recs = th.step_records(workdir)
    assert sorted(recs)[-1] == th.STEPS and recs[th.STEPS]["loss"] < recs[1]["loss"]


def test_console_scripts_resolve():
    with open(os.path.join(th.REPO, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    for script in ("emo-train", "emo-eval"):
        target = re.search(rf'"{script}=([\w.]+):(\w+)"', setup)
        assert target, script
        # In a subprocess: importing an entry point defines its absl flags.
        code = (f"import importlib; f = getattr(importlib.import_module({target.group(1)!r}), "
                f"{target.group(2)!r}); assert callable(f)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=th.REPO, timeout=120)
