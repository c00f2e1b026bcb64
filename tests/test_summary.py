"""`python -m emo_jax.summary` on the reference config: counts without allocating the model."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def summary(config):
    out = subprocess.run([sys.executable, "-m", "emo_jax.summary", f"--config={ROOT / config}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return {k: int(v) for k, v in (line.split("=") for line in out.split())}


def test_reference_config_is_14b_total_1b_active():
    s = summary("configs/emo_1b14b.py")
    assert s["total_params"] == pytest.approx(13.6e9, rel=0.05)
    assert s["active_params"] == pytest.approx(1.07e9, rel=0.05)
    assert s["embedding_params"] == 2 * 100352 * 2048
    # 6 * active matmul weights per token dominates; attention adds the seq-len term.
    assert s["flops_per_token"] > 6 * s["active_params"]


def test_standard_moe_twin_has_the_same_size():
    assert summary("configs/stdmoe_1b14b.py") == summary("configs/emo_1b14b.py")
