"""A simulated pod: two processes x 4 CPU devices on 127.0.0.1 (gloo collectives) train the tiny
model for a few steps and get the same losses as one process with 8 devices.

The mesh is (data, fsdp, expert) = (1, 1, 8), so the expert all_to_alls, the batch and every
gradient reduction span both processes; each process feeds only its own rows of each batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker  # noqa: E402

WORKER = Path(__file__).parent / "multihost_worker.py"
MESH, STEPS = (1, 1, 8), 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
    env["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"worker{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--coordinator", f"127.0.0.1:{port}",
             "--num_processes", "2", "--process_id", str(i), "--devices", "4",
             "--mesh", ",".join(map(str, MESH)), "--steps", str(STEPS),
             "--out", str(tmp_path / f"losses{i}.json")],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        # The reference runs here meanwhile: one process that sees all 8 devices.
        reference = multihost_worker.run_steps(MESH, STEPS)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], output

    results = [json.loads((tmp_path / f"losses{i}.json").read_text()) for i in range(2)]
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["losses"] == results[1]["losses"]  # one global computation
    assert len(reference) == STEPS and len(set(reference)) == STEPS  # training moves the loss
    np.testing.assert_allclose(results[0]["losses"], reference, rtol=1e-6)
