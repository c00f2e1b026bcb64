"""Smoke test of the miniature replication: both models train, select, extract and evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_replication_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "rep"
    subprocess.run([sys.executable, str(ROOT / "bench" / "replicate.py"), f"--out={out}",
                    "--config=configs/tiny.py", "--steps=3", "--smoke", "--max_eval_docs=3",
                    "--fractions=0.125"],  # --smoke skips the analyze reports (own test)
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    result = json.loads((out / "replicate.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"emo", "standard"}
    assert len({r["domain"] for r in result["rows"]}) == 2
    for row in result["rows"]:
        # Physically smaller: 12.5% of 16 experts keeps 2.
        assert row["fraction"] == 0.125 and row["keep"] == 2
        assert row["bytes_kept"] < 1.0
        assert all(x == x for x in (row["full"], row["chosen"], row["random"]))  # not NaN
    assert (out / "replicate.md").exists() and (out / "replicate.png").exists()
