"""Models whose layers keep different numbers of experts (`moe.experts_per_layer`): chosen under a
total budget (`select --keep_total`), extracted, saved without their padding, trained; each
checked against the full model with the same experts masked (a float64 NumPy forward)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax import model_files, parallel
from emo_jax.config import ConfigError, validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.modular import extract as extract_lib
from emo_jax.modular import lazy
from emo_jax.modular import select as select_lib
from emo_jax.modular import subset as subset_lib
from emo_jax.train import step as step_lib
from modular_helpers import packed_row, random_model, reference_forward, tiny_config

IDS = [5, 17, 99, 3, 42, 42, 7, 250, 31, 64, 12, 8]


@pytest.fixture(scope="module")
def full():
    config = tiny_config()  # 2 layers of 9 experts: 1 shared + 8 routed, top_k 2
    return random_model(config, seed=3), config


@pytest.fixture(scope="module")
def budget(full):
    """A random-score subset of 11 experts in all: per layer counts chosen by the budget."""
    model, config = full
    subset = select_lib.select(model, [], None, "random", seed=4, keep_total=11)
    small, small_config, report = extract_lib.extract(model, config, subset)
    return subset, small, small_config, report


def _logits(model, ids, mask_LR=None):
    out = model(jnp.asarray([ids], jnp.int32),
                expert_mask_LR=None if mask_LR is None else jnp.asarray(mask_LR))
    return np.asarray(out.logits_BSV[0], np.float64)


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("value, ok", [
    ("", True), ("9,6", True), ("6,9", True), (" 9, 4", True),
    ("9", False), ("9,6,5", False), ("8,6", False), ("9,2", False), ("9,x", False),
    ("9,10", False),
])
def test_experts_per_layer_is_validated(value, ok):
    config = tiny_config()
    config.moe.experts_per_layer = value
    if ok:
        validate(config)
        return
    with pytest.raises(ConfigError, match=r"config key 'moe.experts_per_layer' is .*; it must be "
                                          r"'' or 2 comma-separated counts .* in \[3, 9\]"):
        validate(config)


def test_budget_keeps_top_k_per_layer_then_the_best_scores_overall(full):
    _, config = full
    model_config = ModelConfig.from_config(config)
    scores_LR = np.array([[8, 7, 6, 5, 4, 3, 2, 1],
                          [0.1, 0.2, 9.5, 9.4, 9.3, 0.3, 0.4, 0.5]])
    # The floor: 2 layers x (1 shared + top_k 2) = 6, routed {0, 1} and {2, 3}. The 5 more go
    # by score over the whole model: 9.3 (layer 1, expert 4), then 6, 5, 4, 3 (layer 0).
    kept = select_lib.under_budget(scores_LR, 11, model_config)
    assert kept == [[0, 1, 2, 3, 4, 5], [2, 3, 4]]
    assert select_lib.under_budget(scores_LR, 6, model_config) == [[0, 1], [2, 3]]
    for bad in (5, 19, 7.5):
        with pytest.raises(subset_lib.SubsetError, match=r"--keep_total.*6 <= N <= 18"):
            select_lib.under_budget(scores_LR, bad, model_config)


def test_budget_subset_file_round_trips_and_is_refused_for_layerwise(full, budget, tmp_path):
    model, _ = full
    subset = budget[0]
    assert isinstance(subset.keep, list) and sum(subset.keep) == 11
    assert len(set(subset.keep)) > 1, "this seed should give layers different counts"
    path = subset_lib.save(subset, str(tmp_path / "s.json"))
    again = subset_lib.load(path)
    assert again.layers == subset.layers and again.keep == subset.keep
    with pytest.raises(subset_lib.SubsetError, match="--keep_total needs a one-pass method"):
        select_lib.select(model, [], None, "layerwise", keep_total=11)


def test_extracted_budget_model_equals_the_masked_full_model(full, budget):
    model, config = full
    subset, small, small_config, report = budget
    assert small_config.moe.num_experts == max(subset.keep)
    assert small_config.moe.experts_per_layer == ",".join(map(str, subset.keep))
    assert report["num_experts_after"] == subset.keep
    expected = reference_forward(model, IDS, subset.mask())[2]
    np.testing.assert_allclose(_logits(small, IDS), expected, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(_logits(small, IDS), _logits(model, IDS, subset.mask()),
                               atol=2e-6, rtol=1e-5)
    # The padding is zero and never routed: a layer with fewer experts sends nothing there.
    exists_LR = small.config.existing_experts_LR()
    moe = small.blocks.moe
    assert not np.any(np.asarray(moe.w_gate[...])[~exists_LR])
    assert not np.any(np.asarray(moe.router[...]).transpose(0, 2, 1)[~exists_LR])
    out = small(jnp.asarray([IDS], jnp.int32), capture=("expert_idx",))
    idx_LBSK = np.asarray(out.captured["expert_idx_BSK"])
    for layer, ids in enumerate(subset.layers):
        assert idx_LBSK[layer].max() < len(ids)


def test_a_subset_of_a_model_with_per_layer_counts(full, budget):
    """select and extract again from the budget model: only the experts a layer has are ever
    chosen, and the result equals masking the budget model."""
    subset, small, _, _ = budget
    _, small_config = budget[1], budget[2]
    for method in ("random", "global"):
        batches = [packed_row([IDS], 16)]
        again = select_lib.select(small, batches, 3, method, seed=1)
        for layer, ids in enumerate(again.layers):
            assert max(ids) < len(subset.layers[layer])
        smaller, _, _ = extract_lib.extract(small, small_config, again)
        np.testing.assert_allclose(_logits(smaller, IDS), _logits(small, IDS, again.mask()),
                                   atol=2e-6, rtol=1e-5)
    # An id the padded stacks have but the smaller layer does not is refused.
    small_layer = int(np.argmin(subset.keep))
    layers = [[0, 1], [0, 1]]
    layers[small_layer] = [0, subset.keep[small_layer] - 1]
    bad = subset_lib.Subset(layers=layers, keep=3, shared_experts=1, method="x", data={},
                            model={"shape": subset_lib.model_shape(small_config)})
    with pytest.raises(subset_lib.SubsetError,
                       match=rf"layer {small_layer}: ids must be ascending, distinct and in"):
        subset_lib.from_json(bad.to_json())


def test_saved_restored_and_extracted_lazily_alike(full, budget, tmp_path):
    model, config = full
    subset, small, small_config, _ = budget
    model_files.save_model(str(tmp_path / "small"), small, small_config)
    restored, restored_config, _ = model_files.restore_model(str(tmp_path / "small"))
    assert restored_config.moe.experts_per_layer == small_config.moe.experts_per_layer
    np.testing.assert_array_equal(_logits(restored, IDS), _logits(small, IDS))
    # Lazy extraction from the full model's directory writes the same arrays.
    model_files.save_model(str(tmp_path / "full"), model, config)
    lazy.extract_lazy(str(tmp_path / "full"), subset, str(tmp_path / "lazy"))
    lazy_model, lazy_config, _ = model_files.restore_model(str(tmp_path / "lazy"))
    assert lazy_config.moe.experts_per_layer == small_config.moe.experts_per_layer
    for a, b in zip(jax.tree.leaves(nnx.state(lazy_model)), jax.tree.leaves(nnx.state(small))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_padding_takes_no_space_on_disk(tmp_path):
    """A model directory stores expert stacks one expert per chunk, and chunks of zeros are not
    written: the same arrays with random padding take about the padding's bytes more."""
    config = tiny_config(expert_hidden=256, experts_per_layer="9,5")
    pure = nnx.to_pure_dict(nnx.state(random_model(config, seed=1)))  # padding random too
    missing_LR = ~ModelConfig.from_config(config).existing_experts_LR()
    padding = 0
    zeroed = jax.tree.map(np.array, pure)
    for name in ("w_gate", "w_up", "w_down"):
        w = zeroed["blocks"]["moe"][name]
        padding += w[missing_LR].nbytes
        w[missing_LR] = 0.0
    model_files.save_params(str(tmp_path / "zeroed"), zeroed, config)
    model_files.save_params(str(tmp_path / "random"), pure, config)
    stored = _dir_bytes(tmp_path / "zeroed" / "params")
    filled = _dir_bytes(tmp_path / "random" / "params")
    assert filled - stored > 0.8 * padding, (stored, filled, padding)


def test_training_keeps_the_padding_zero_and_balances_over_existing_experts(budget):
    _, _, small_config, _ = budget
    config = validate(small_config)
    config.data.seq_len, config.data.batch_size = 16, 4
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    graphdef, state, shardings = step_lib.init_state(config, mesh)
    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(1, 250, (4, 16)).astype(np.int32),
             "segment_ids": np.ones((4, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
    for _ in range(2):
        state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    exists_LR = ModelConfig.from_config(config).existing_experts_LR()
    moe = state["model"]["blocks"]["moe"]
    for name in ("w_gate", "w_up", "w_down"):
        w = np.asarray(moe[name][...])
        assert not np.any(w[~exists_LR]) and np.all(np.any(w[exists_LR], axis=(-1, -2)))
    assert not np.any(np.asarray(moe["router"][...]).transpose(0, 2, 1)[~exists_LR])
    counts_LR = np.asarray(metrics["counts_LR"])
    assert not np.any(counts_LR[~exists_LR])
    unused = np.sum((counts_LR == 0) & exists_LR, -1)
    np.testing.assert_array_equal(np.asarray(metrics["unused_experts_L"]), unused)
