"""`python -m emo_jax.plan`: the train step compiled ahead of time for local CPU devices or a TPU
topology, its memory per device and the final `plan:` line; exit 0 when it fits, 2 when not."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from emo_jax.train import plan as plan_lib
from train_helpers import REPO, cli_env

PLAN_LINE = re.compile(
    r"plan: fits=(yes|no) devices=(\d+) kind=(\S+) hbm_gb=(\d+\.\d+) args_gb=(\d+\.\d+) "
    r"temp_gb=(\d+\.\d+) total_gb=(\d+\.\d+) compile_s=(\d+\.\d+)")


def _plan(*args, timeout=600, env=None):
    cmd = [sys.executable, "-m", "emo_jax.plan", f"--config={REPO}/configs/tiny.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or cli_env(8), text=True, capture_output=True,
                          timeout=timeout)


def _last_line(proc):
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    match = PLAN_LINE.fullmatch(lines[-1])
    assert match, f"bad final line {lines[-1]!r}\n{proc.stderr}"
    return match


@pytest.mark.parametrize("name, expected", [
    ("v5p-128", ("v5p", "v5p:4x4x4")), ("v5p-16", ("v5p", "v5p:2x2x2")),
    ("v5p-32", ("v5p", "v5p:2x2x4")), ("v5p-8", ("v5p", "v5p:2x2x1")),
    ("v4-8", ("v4", "v4:2x2x1")), ("v4-64", ("v4", "v4:2x4x4")),
    ("v5e-8", ("v5e", "v5e:2x4")), ("v5litepod-16", ("v5e", "v5e:4x4")),
    ("v6e-256", ("v6e", "v6e:16x16")), ("v6e-1", ("v6e", "v6e:1x1")),
    ("v5p:2x2x3", ("v5p", "v5p:2x2x3")),
])
def test_cloud_names_map_to_libtpu_topologies(name, expected):
    assert plan_lib.topology_name(name) == expected


@pytest.mark.parametrize("name", ["v5p-7", "v5p-12", "v5e-2", "v3-8", "tpu", "v5p:2x2",
                                  "v6e:0x4"])
def test_unknown_topology_names_list_the_valid_forms(name):
    with pytest.raises(plan_lib.PlanError, match="valid forms"):
        plan_lib.topology_name(name)


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(plan_lib, "libtpu_available", lambda: False)
    with pytest.raises(plan_lib.PlanError, match=re.escape("pip install -e '.[tpu]'")):
        plan_lib.tpu_target("v5p-8")


def test_largest_buffers_reads_the_optimised_hlo():
    compiled = jax.jit(lambda x: jnp.sin(x @ x.T) @ x).lower(jnp.ones((256, 64))).compile()
    buffers = plan_lib.largest_buffers(compiled.as_text())
    assert buffers and buffers[0]["bytes"] >= 256 * 256 * 4
    assert buffers == sorted(buffers, key=lambda b: -b["bytes"])


def test_tiny_config_fits_on_the_local_cpu_devices():
    proc = _plan()
    assert proc.returncode == 0, proc.stderr
    match = _last_line(proc)
    assert match.group(1) == "yes" and match.group(2) == "8" and match.group(3) == "cpu"
    args, temp, total = (float(match.group(i)) for i in (5, 6, 7))
    assert 0 < args and 0 < temp and total >= args + temp - 0.002
    assert "model FLOPs per step" in proc.stdout


def test_a_plan_that_does_not_fit_exits_2_with_its_largest_buffers():
    proc = _plan("--hbm_gb=0.001")
    assert proc.returncode == 2, proc.stderr
    match = _last_line(proc)
    assert match.group(1) == "no" and match.group(4) == "0.001"
    assert "largest buffers" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--topology=v5p-7"], "unknown topology 'v5p-7'; valid forms"),
    (["--config.mesh.data=3"], "8 are available"),
    (["--hbm_gb=-1"], "--hbm_gb must be > 0"),
])
def test_bad_input_is_one_line_and_status_2(args, message):
    proc = _plan(*args, timeout=120)
    assert proc.returncode == 2
    assert "plan:" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tiny_config_compiles_for_a_v5p_8_slice():
    env = cli_env(None)
    env.pop("XLA_FLAGS", None)
    proc = _plan("--topology=v5p-8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = _last_line(proc)
    assert match.groups()[:4] == ("yes", "4", "v5p", "95.000")
