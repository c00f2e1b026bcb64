"""Shared by the training, checkpoint and eval tests: the CLI in a subprocess, and one reference
training run shared by every test (and every xdist worker) of a session.

Every end-to-end run uses the tiny config with the same compiled shapes (`BASE_ARGS`), and a
persistent JAX compilation cache shared by all subprocesses, so only the first run compiles.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # the reference run: 2N steps with checkpoints every N
EVERY = 4
BASE_ARGS = [
    f"--config={REPO}/configs/tiny.py",
    f"--config.train.steps={STEPS}",
    f"--config.checkpoint.every={EVERY}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=1",
]
CACHE = os.path.join(tempfile.gettempdir(), f"emo_jax_test_jax_cache_{os.getuid()}")
# Tests check what is computed, not how fast: XLA's backend optimisation passes off cut the CPU
# compile time of the suite by about a third (conftest.py sets it for in-process tests too).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cli_env(devices: int | None = 8) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return env


def train_cmd(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "emo_jax.train", *BASE_ARGS, f"--workdir={workdir}", *extra]


def run_train(workdir, *extra, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(workdir, *extra), cwd=REPO, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_train(workdir, *extra, log_path=None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(train_cmd(workdir, *extra), cwd=REPO, env=cli_env(),
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def records(workdir) -> list[dict]:
    """The records of a workdir's metrics.jsonl (local, or gs:// through emo_jax.storage)."""
    if str(workdir).startswith("gs://"):
        from emo_jax import storage

        path = storage.join(str(workdir), "metrics.jsonl")
        text = storage.read_text(path) if storage.exists(path) else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(workdir) -> dict[int, dict]:
    """The last training record of every step (a resumed run re-runs a few steps)."""
    out = {}
    for r in records(workdir):
        if "loss" in r and "event" not in r:
            out[r["step"]] = r
    return out


def losses(workdir) -> dict[int, tuple[float, int]]:
    return {s: (r["loss"], r["data_crc32"]) for s, r in step_records(workdir).items()}


def shared_once(tmp_path_factory, name: str, make):
    """A directory `make(path)` fills once per test session, shared by the xdist workers (the
    first to come makes it under a lock, the others wait for it and reuse it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one basetemp per worker, under a shared root
        root = root.parent
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (path / "DONE").exists():
                shutil.rmtree(path, ignore_errors=True)  # the remains of a failed attempt
                path.mkdir(parents=True)
                make(path)
                (path / "DONE").write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def reference_run(tmp_path_factory) -> str:
    """Workdir of one uninterrupted STEPS-step run, shared across xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one basetemp per worker, under a shared root
        root = root.parent
    workdir = root / "reference_run"
    with open(root / "reference_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (workdir / "DONE").exists():
                run_train(workdir)
                (workdir / "DONE").write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(workdir)
