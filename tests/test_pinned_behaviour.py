"""Pinned end-to-end behaviour: a fixed-seed 20-step run of configs/tiny.py on one device gives
these per-step losses and this evaluation loss, and `select` on its checkpoint picks these
experts with each scoring method. The values were recorded from the code as it stood before the
model code was restructured; any change to the model's math or to routing shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th

TINY = f"{th.REPO}/configs/tiny.py"
CORPUS_EVAL = f"{th.REPO}/emo_jax/data/corpus/eval.jsonl.gz"

LOSSES = [5.755033493041992, 5.751275062561035, 5.655893802642822, 5.625531196594238,
          5.612559795379639, 5.4962639808654785, 5.468545436859131, 5.171623229980469,
          5.281921863555908, 5.295117378234863, 5.182727813720703, 5.183629512786865,
          5.043206691741943, 4.747458457946777, 4.575272083282471, 4.48306131362915,
          4.314267635345459, 4.533647537231445, 4.278650283813477, 4.237468242645264]
EVAL_LOSS = 3.6480252605159866
SUBSETS = {  # routed experts kept per layer with --keep=4 (1 shared + 3 routed)
    "layerwise": [[5, 7, 13], [3, 9, 13]],
    "global": [[5, 7, 13], [3, 11, 13]],
    "easy_ep": [[5, 7, 13], [3, 11, 13]],
}


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=th.REPO, env=th.cli_env(devices=1),
                          text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pinned") / "run"
    _run("emo_jax.train", f"--config={TINY}", f"--workdir={path}", "--config.train.steps=20",
         "--config.train.log_every=1", "--config.train.eval_every=1000",
         "--config.checkpoint.every=20")
    return path


def test_twenty_steps_give_the_pinned_losses(workdir):
    records = th.step_records(workdir)
    got = [records[s]["loss"] for s in range(1, 21)]
    np.testing.assert_allclose(got, LOSSES, rtol=2e-5)
    done = [r for r in th.records(workdir) if r.get("event") == "done"]
    np.testing.assert_allclose(done[-1]["eval_loss"], EVAL_LOSS, rtol=2e-5)


@pytest.mark.parametrize("method", sorted(SUBSETS))
def test_select_picks_the_pinned_experts(workdir, tmp_path, method):
    out = tmp_path / f"{method}.json"
    _run("emo_jax.select", f"--checkpoint={workdir}", f"--data={CORPUS_EVAL}", "--max_docs=16",
         "--keep=4", f"--method={method}", f"--out={out}")
    assert json.loads(out.read_text())["layers"] == SUBSETS[method]
