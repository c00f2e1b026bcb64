"""Bad input and interruptions as a new user meets them, through the CLIs in subprocesses: one
line naming the file, key or value (never a traceback), the documented exit status, skipped data
records reported, and nothing already written lost or left half-written."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train_helpers as th


def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=th.REPO, env=th.cli_env(),
                          text=True, capture_output=True, timeout=timeout)


def _one_error_line(proc, status=2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _truncated_gzip(path, n_lines=24):
    lines = [json.dumps({"text": f"document {i} " + "words " * (i % 5 + 2)})
             for i in range(n_lines)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path.write_bytes(data[:len(data) * 2 // 3])


def test_bad_records_are_skipped_counted_and_reported(tmp_path):
    _truncated_gzip(tmp_path / "cut.jsonl.gz")
    lines = [json.dumps({"text": f"good document {i} " * 4}) for i in range(12)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:6] + ["{not json", '{"body": 1}']
                                                  + lines[6:]) + "\n")
    workdir = tmp_path / "w"
    proc = th.run_train(workdir, f"--config.data.train_sources={tmp_path}/cut.jsonl.gz,"
                                 f"{tmp_path}/bad.jsonl")
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if "bad data records" in line]
    assert warnings, proc.stdout
    assert len(warnings) <= 3  # rate-limited: the first, at most one a minute, the end
    assert "cut.jsonl.gz" in proc.stdout or "bad.jsonl" in proc.stdout
    assert any("bad records" in line for line in proc.stdout.splitlines()
               if line.startswith("step "))  # the progress line
    recs = th.step_records(workdir)
    assert all("skipped_records" in r for r in recs.values())
    counts = [recs[s]["skipped_records"] for s in sorted(recs)]
    assert counts == sorted(counts) and counts[-1] > 0
    done = [r for r in th.records(workdir) if r.get("event") == "done"][0]
    assert done["skipped_records"] >= counts[-1]


def test_data_that_is_not_gzip_fails_with_one_line_and_leaves_no_workdir(tmp_path):
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps({"text": "hello"}) + "\n")
    for key in ("train_sources", "eval_sources"):
        workdir = tmp_path / f"w_{key}"
        proc = th.run_train(workdir, f"--config.data.{key}={tmp_path}/plain.jsonl.gz",
                            check=False)
        line = _one_error_line(proc)
        assert "plain.jsonl.gz" in line and "line 1" in line and "not gzip data" in line, line
        assert not workdir.exists()


def test_bad_workdir_and_bad_data_path_leave_nothing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    line = _one_error_line(th.run_train(a_file, check=False))
    assert f"workdir '{a_file}' is a file" in line
    assert a_file.read_text() == "keep me"
    line = _one_error_line(th.run_train(a_file / "sub", check=False))
    assert "a_file/sub" in line and "cannot be created" in line
    workdir = tmp_path / "new"
    line = _one_error_line(th.run_train(workdir, f"--config.data.train_sources={tmp_path}/no",
                                        check=False))
    assert f"'{tmp_path}/no' does not exist" in line
    assert not workdir.exists()
    # An existing workdir is never removed.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    _one_error_line(th.run_train(tmp_path / "mine", f"--config.data.train_sources={tmp_path}/no",
                                 check=False))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_sigterm_during_startup_says_nothing_was_saved(tmp_path):
    workdir = tmp_path / "w"
    proc = th.start_train(workdir, log_path=tmp_path / "log")
    deadline = time.time() + 300
    while not workdir.exists():  # created early in startup, long before the first step
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    if "SIGTERM received: saved checkpoint" in log:
        pytest.skip("the run reached its first step before the signal")
    assert rc == 128 + signal.SIGTERM, log
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith("training ")]
    assert lines == [f"error: SIGTERM received before the first training step: stopped; "
                     f"nothing was saved; removed the workdir {workdir} that it had created"], log
    assert not workdir.exists()


def test_select_and_analyze_refuse_to_overwrite(tmp_path):
    out = tmp_path / "subset.json"
    out.write_text("precious")
    line = _one_error_line(_run(["emo_jax.select", f"--checkpoint={tmp_path}/none",
                                 "--text=hi", "--keep=3", f"--out={out}"]))
    assert f"--out={out} exists; pass --overwrite" in line
    # With --overwrite the refusal is lifted (this one then fails on the missing checkpoint).
    line = _one_error_line(_run(["emo_jax.select", f"--checkpoint={tmp_path}/none",
                                 "--text=hi", "--keep=3", f"--out={out}", "--overwrite"]))
    assert "exists" not in line and "none" in line
    assert out.read_text() == "precious"
    line = _one_error_line(_run(["emo_jax.select", "--compose", str(out), str(out),
                                 f"--out={tmp_path}"]))
    assert "is a directory" in line
    report = tmp_path / "analysis"
    report.mkdir()
    (report / "report.md").write_text("old")
    line = _one_error_line(_run(["emo_jax.analyze", f"--checkpoint={tmp_path}/none",
                                 f"--data={out}", f"--out={report}"]))
    assert f"--out={report} exists; pass --overwrite" in line
    line = _one_error_line(_run(["emo_jax.analyze", f"--checkpoint={tmp_path}/none",
                                 f"--data={out}", f"--out={out}"]))
    assert "is a file" in line
    assert (report / "report.md").read_text() == "old"


def test_atomic_writers_leave_old_results_on_failure(tmp_path):
    from emo_jax.cli import directory_written_atomically, write_text_atomically

    path = tmp_path / "f.json"
    write_text_atomically(str(path), "one")
    write_text_atomically(str(path), "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.json"]
    out = tmp_path / "d"
    with directory_written_atomically(str(out)) as work:
        (tmp_path / work / "a").write_text("first")
    with pytest.raises(RuntimeError):
        with directory_written_atomically(str(out)) as work:
            (tmp_path / work / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a").read_text() == "first"
    with directory_written_atomically(str(out)) as work:
        (tmp_path / work / "b").write_text("second")
    assert os.listdir(out) == ["b"] and sorted(os.listdir(tmp_path)) == ["d", "f.json"]
