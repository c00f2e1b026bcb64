"""Every shipped config loads, validates and documents the command that runs it; the reference
recipe has the sizes of docs/METHOD.md §5; the standard-MoE twin differs only in the pool."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from emo_jax.config import validate
from emo_jax.model.summary import summarize
from emo_jax.model.model_config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_required_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.py", "small.py", "emo_1b14b.py", "stdmoe_1b14b.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_and_documents_its_command(path):
    module = _load(path)
    config = validate(module.get_config())
    name = os.path.relpath(path, REPO)
    assert f"python -m emo_jax.train --config={name}" in module.__doc__
    summary = summarize(ModelConfig.from_config(config), config.data.seq_len)
    assert 0 < summary["active_params"] < summary["total_params"]


def test_reference_recipe_sizes():
    c = validate(_load(os.path.join(REPO, "configs", "emo_1b14b.py")).get_config())
    m, e, t, d = c.model, c.moe, c.train, c.data
    assert (m.num_layers, m.d_model, m.num_heads, m.head_dim) == (16, 2048, 16, 128)
    assert (m.vocab_size, m.rope_theta, m.norm_eps, m.compute_dtype) == (
        100_352, 500_000.0, 1e-6, "bfloat16")
    assert (e.num_experts, e.num_shared_experts, e.top_k, e.expert_hidden) == (128, 1, 7, 1024)
    assert (e.pool, e.pool_min, e.pool_max) == ("document", 8, 128)
    assert (t.lr, t.b1, t.b2, t.weight_decay, t.clip_norm) == (4e-3, 0.9, 0.95, 0.1, 1.0)
    assert (t.warmup_steps, t.schedule, t.final_lr_fraction) == (2000, "cosine", 0.1)
    assert (d.batch_size, d.seq_len) == (1024, 4096)
    s = summarize(ModelConfig.from_config(c), c.data.seq_len)
    assert 13e9 < s["total_params"] < 15e9 and 0.9e9 < s["active_params"] < 1.2e9


def test_summary_counts_every_shared_expert_and_their_router():
    """A second shared expert adds its SwiGLU weights and the shared router ([D, 2] per layer;
    one shared expert has none) to the total and to the active parameters."""
    c = validate(_load(os.path.join(REPO, "configs", "tiny.py")).get_config())
    assert c.moe.num_shared_experts == 1
    one = summarize(ModelConfig.from_config(c), c.data.seq_len)
    c.moe.num_experts += 1
    c.moe.num_shared_experts = 2
    two = summarize(ModelConfig.from_config(validate(c)), c.data.seq_len)
    m, f = c.model, c.moe.expert_hidden
    added = m.num_layers * (3 * m.d_model * f + 2 * m.d_model)
    assert two["total_params"] - one["total_params"] == added
    assert two["active_params"] - one["active_params"] == added
    assert two["routed_expert_params"] == one["routed_expert_params"]


def test_standard_moe_twin_differs_only_in_the_pool():
    emo = _load(os.path.join(REPO, "configs", "emo_1b14b.py")).get_config().to_dict()
    std = _load(os.path.join(REPO, "configs", "stdmoe_1b14b.py")).get_config().to_dict()
    assert std["moe"].pop("pool") == "none" and emo["moe"].pop("pool") == "document"
    assert std == emo


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci_last = [line for line in f.read().splitlines() if line.strip()][-1]
    assert ci_last.endswith("python -m pytest -n 2 -q tests")
    assert f"\n{ci_last}\n" in readme
