"""Faults of checkpoints, table-driven, through the CLIs in subprocesses: bytes flipped in a
checkpoint (caught by its checksums), an unreadable checkpoint, a failed save. Each case asserts
the exit status, the one line that says what happened (no traceback), and that no good file
changed. One trained workdir (train_helpers.reference_run) is shared; cases work on copies.
The README's table "Faults and bad inputs" lists these cases."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import train_helpers as th


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


def flip_bytes(step_dir: pathlib.Path) -> pathlib.Path:
    """XORs 8 bytes in the middle of the biggest data file of a checkpoint's params: same size,
    and the file still decodes (the values are wrong)."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    big.write_bytes(bytes(data))
    return big


def truncate(step_dir: pathlib.Path):
    for path in (step_dir / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            with open(path, "r+b") as f:
                f.truncate(16)


def snapshot(root) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in pathlib.Path(root).rglob("*") if p.is_file()}


def _run(args):
    return subprocess.run([sys.executable, "-m", *args], cwd=th.REPO, env=th.cli_env(),
                          text=True, capture_output=True, timeout=600)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _eval(workdir, *extra):
    return _run(["emo_jax.eval", f"--checkpoint={workdir}", "--data=", "--max_documents=4",
                 *extra])


# (case, damage of checkpoint STEPS, extra eval flags, exit status, the one line, warning?)
EVAL_CASES = [
    ("eval, newest checkpoint corrupt", flip_bytes, [], 0,
     f"checkpoints/{th.STEPS} is corrupt (checksum mismatch in params/", True),
    ("eval --step of a corrupt checkpoint", flip_bytes, [f"--step={th.STEPS}"], 2,
     f"error: checkpoint {{w}}/checkpoints/{th.STEPS} is corrupt: checksum mismatch in params/",
     False),
    ("eval, newest checkpoint unreadable", truncate, [], 0,
     f"checkpoints/{th.STEPS} is unreadable (", True),
    ("eval --step of an unreadable checkpoint", truncate, [f"--step={th.STEPS}"], 2,
     f"error: checkpoint {{w}}/checkpoints/{th.STEPS} is unreadable: ", False),
]


@pytest.mark.parametrize("case, damage, extra, status, line, warning", EVAL_CASES,
                         ids=[c[0] for c in EVAL_CASES])
def test_eval_of_a_damaged_checkpoint(reference, tmp_path, case, damage, extra, status, line,
                                      warning):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    damage(workdir / "checkpoints" / str(th.STEPS))
    before = snapshot(workdir)
    proc = _eval(workdir, *extra)
    assert proc.returncode == status, (case, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and line.format(w=workdir) in err[0], (case, proc.stderr)
    if warning:  # the fallback names the step it used, and evaluates it
        assert f"using step {th.EVERY} instead" in err[0]
        assert _lines(proc.stdout)[0].startswith("all: loss ")
    assert snapshot(workdir) == before


def test_train_resumes_from_the_checkpoint_before_a_corrupt_one(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    flip_bytes(workdir / "checkpoints" / str(th.STEPS))
    good = {k: v for k, v in snapshot(workdir).items() if f"checkpoints/{th.STEPS}/" not in k
            and "checkpoints/" in k}
    proc = th.run_train(workdir)
    err = _lines(proc.stderr)
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"checkpoints/{th.STEPS} is corrupt (checksum mismatch" in err[0]
    assert f"resuming from step {th.EVERY}" in err[0] and "checkpoints_unreadable" in err[0]
    assert f"resumed from checkpoint {th.EVERY}" in proc.stdout
    aside = os.listdir(workdir / "checkpoints_unreadable")
    assert len(aside) == 1 and aside[0].startswith(f"{th.STEPS}-")
    ref, got = th.losses(reference), th.losses(workdir)
    assert got == ref  # steps EVERY+1.. re-run bit for bit
    now = snapshot(workdir)
    assert all(now.get(k) == v for k, v in good.items())  # checkpoint EVERY untouched
    # The re-saved checkpoint verifies: it is the one a tool reads.
    from emo_jax import model_files

    assert model_files.restore_model(str(workdir))[2]["step"] == th.STEPS


def test_failed_save_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(reference,
                                                                                  tmp_path):
    workdir = tmp_path / "w"
    # Checkpoints every 2 steps; the save of step 4 hits a 64 KiB file-size limit (EFBIG, as a
    # full disk or a quota): a real OSError inside Orbax's asynchronous save.
    proc = th.run_train(workdir, "--config.checkpoint.every=2",
                        "--config.checkpoint.inject_save_failure_step=4", check=False)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    err = _lines(proc.stderr)
    assert len(err) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert err[0].startswith(f"error: saving checkpoint {workdir}/checkpoints/4 failed: "
                             "OSError: [Errno 27] File too large: "), err[0]
    assert "the newest complete checkpoint is 2" in err[0]
    steps = sorted(th.step_records(workdir))
    assert steps[-1] < th.STEPS  # noticed at a logged step, before the end
    assert sorted(n for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == ["2"]
    good = snapshot(workdir / "checkpoints" / "2")
    proc = th.run_train(workdir, "--config.checkpoint.every=2")
    assert "resumed from checkpoint 2" in proc.stdout
    assert th.losses(workdir) == th.losses(reference)
    assert snapshot(workdir / "checkpoints" / "2") == good or not (
        workdir / "checkpoints" / "2").exists()  # kept, or removed by keep-last-K only
