"""The standalone model API of emo_jax.model_files: restore_model from a training workdir
(latest, a step, a step directory) and from a model directory written by save_model, and a model
directory as --init_checkpoint of a new run."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from emo_jax import model_files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


def _params(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def _assert_equal(a, b):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y)


def test_restore_model_from_a_workdir_and_save_model_roundtrip(reference, tmp_path):
    model, config, meta = model_files.restore_model(reference)
    assert meta["step"] == th.STEPS and meta["kind"] == "workdir"
    assert meta["summary"]["total_params"] > 0
    assert config.train.steps == th.STEPS and config.model.d_model == 64
    at_4, _, meta4 = model_files.restore_model(
        os.path.join(reference, "checkpoints", str(th.EVERY)))
    assert meta4["step"] == th.EVERY
    _assert_equal(_params(at_4),
                  _params(model_files.restore_model(reference, step=th.EVERY)[0]))
    assert not np.array_equal(_params(at_4)["embed"], _params(model)["embed"])

    out = tmp_path / "model"
    model_files.save_model(str(out), model, config, {"step": meta["step"], "source": reference})
    assert sorted(os.listdir(out)) == ["checksums.json", "config.json", "metadata.json",
                                       "params"]
    assert not os.path.exists(str(out) + ".partial")
    with open(out / "metadata.json") as f:
        saved = json.load(f)
    assert saved["format"] == "emo_jax.model" and saved["step"] == th.STEPS
    with pytest.raises(model_files.CheckpointError, match="exists"):
        model_files.save_model(str(out), model, config)
    again, config2, meta2 = model_files.restore_model(str(out))
    assert meta2["kind"] == "model" and config2.to_dict() == config.to_dict()
    _assert_equal(_params(model), _params(again))

    # The restored model runs (on its mesh) and gives the same logits as the original.
    tokens = np.arange(8 * 16, dtype=np.int32).reshape(8, 16) % 200 + 1
    ones = np.ones_like(tokens)
    positions = np.tile(np.arange(16, dtype=np.int32), (8, 1))

    @jax.jit
    def logits(state):
        return nnx.merge(nnx.graphdef(model), state)(tokens, ones, positions).logits_BSV

    with jax.set_mesh(model_files.model_mesh(again)):
        np.testing.assert_array_equal(logits(nnx.state(model)), logits(nnx.state(again)))


def test_restore_model_errors(tmp_path):
    with pytest.raises(model_files.CheckpointError, match="no emo_jax checkpoint"):
        model_files.restore_model(str(tmp_path))


@pytest.mark.slow
def test_model_directory_as_init_checkpoint(reference, tmp_path):
    model, config, _ = model_files.restore_model(reference)
    model_files.save_model(str(tmp_path / "model"), model, config)
    workdir = tmp_path / "finetune"
    th.run_train(workdir, f"--init_checkpoint={tmp_path / 'model'}")
    first = th.step_records(workdir)[1]
    ref = th.step_records(reference)
    # Same first batch as the reference run, but from its trained parameters: a lower loss.
    assert first["data_crc32"] == ref[1]["data_crc32"]
    assert first["loss"] < ref[1]["loss"] - 0.05
