"""Transplanting expert modules (emo_jax/modular/transplant.py, `python -m emo_jax.compose`):
the composed checkpoint is the base except exactly the transplanted expert rows and router
columns, which are the sources'; overlapping claims and other architectures are refused."""

import os
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from emo_jax.modular import lazy, subset as subset_lib, transplant
from emo_jax.model_files import save_model

from modular_helpers import random_model, tiny_config

A_LAYERS = [[1, 4, 6], [0, 2, 7]]
B_LAYERS = [[0, 2, 3], [1, 3, 4]]
EXPERTS = ("w_gate", "w_up", "w_down")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Base, source A and source B: one architecture, different weights; A's and B's subsets."""
    d = tmp_path_factory.mktemp("transplant")
    config = tiny_config()
    paths = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        model = random_model(config, seed)
        paths[name] = save_model(str(d / name), model, config)
        if name != "base":
            layers = A_LAYERS if name == "a" else B_LAYERS
            subset = subset_lib.make_subset(layers, config=config, model=model, method="manual",
                                            data={})
            paths[name + ".json"] = subset_lib.save(subset, str(d / f"{name}.json"))
    paths["dir"] = str(d)
    return paths


def arrays(path) -> dict:
    reader = lazy.ParamsReader(path)
    return {name: reader.read(name) for name in reader.names}


def test_composed_is_base_except_transplanted_rows(checkpoints, monkeypatch):
    p = checkpoints
    out = os.path.join(p["dir"], "composed")
    proc = subprocess.run(
        [sys.executable, "-m", "emo_jax.compose", f"--base={p['base']}",
         f"--take={p['a']}:{p['a.json']}", f"--take={p['b']}:{p['b.json']}", f"--out={out}"],
        cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "12 of 16 routed experts transplanted" in proc.stdout
    base, a, b, got = arrays(p["base"]), arrays(p["a"]), arrays(p["b"]), arrays(out)
    assert sorted(got) == sorted(base)
    for name in base:
        expected = base[name].copy()
        leaf = name.split("/")[-1]
        for source, layers in ((a, A_LAYERS), (b, B_LAYERS)):
            for layer, ids in enumerate(layers):
                if leaf in EXPERTS:
                    expected[layer, ids] = source[name][layer, ids]
                elif leaf == "router":
                    expected[layer][:, ids] = source[name][layer][:, ids]
        assert got[name].dtype == base[name].dtype
        assert np.array_equal(got[name].view(np.uint32), expected.view(np.uint32)), name
        if leaf in EXPERTS + ("router",):  # the sources really differ: the test can fail
            assert not np.array_equal(got[name], base[name])
    # Written in blocks of 2 experts (several per layer), the same result.
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 2 * 32 * 32 * 4)
    takes = [(p["a"], subset_lib.load(p["a.json"])), (p["b"], subset_lib.load(p["b.json"]))]
    small_blocks = transplant.compose(p["base"], takes, out + "_blocks")
    assert small_blocks["experts_transplanted"] == 12
    again = arrays(out + "_blocks")
    for name in got:
        np.testing.assert_array_equal(again[name], got[name])
    # Every tool reads the result like any checkpoint.
    from emo_jax.model_files import restore_model

    model, config, metadata = restore_model(out)
    assert metadata["composed"]["experts_transplanted"] == 12
    np.testing.assert_array_equal(np.asarray(model.blocks.moe.w_up[...]),
                                  got["blocks/moe/w_up"])


def test_overlapping_claims_are_refused(checkpoints):
    p = checkpoints
    clash = subset_lib.load(p["b.json"])
    clash.layers = [[0, 2, 3], [1, 3, 7]]  # layer 1 expert 7 is also A's
    takes = [(p["a"], subset_lib.load(p["a.json"])), (p["b"], clash)]
    out = os.path.join(p["dir"], "clash")
    with pytest.raises(transplant.CompositionError,
                       match=r"layer 1 expert 7 is claimed twice: by A and by B"):
        transplant.compose(p["base"], takes, out, names=["A", "B"])
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_other_architecture_is_refused(checkpoints, tmp_path):
    config = tiny_config()
    config.model.rope_theta = 500.0
    other = save_model(str(tmp_path / "other"), random_model(config, 3), config)
    takes = [(other, subset_lib.load(checkpoints["a.json"]))]
    with pytest.raises(transplant.CompositionError,
                       match=r"model.rope_theta=500.0 there but 10000.0 in the base"):
        transplant.compose(checkpoints["base"], takes, str(tmp_path / "out"), names=["A"])
    wide = tiny_config(expert_hidden=16)
    other = save_model(str(tmp_path / "wide"), random_model(wide, 3), wide)
    takes = [(other, subset_lib.load(checkpoints["a.json"]))]
    with pytest.raises(transplant.CompositionError, match=r"moe.expert_hidden=16 there but 32"):
        transplant.compose(checkpoints["base"], takes, str(tmp_path / "out"), names=["A"])
