"""Subset selection: scores against a float64 NumPy reference of the whole model, the greedy
layer-by-layer procedure, Easy-EP, random, and bad K."""

import numpy as np
import pytest
from flax import nnx

from emo_jax.modular import select, subset as subset_lib
from emo_jax.modular.probe import Probe

from modular_helpers import packed_row, random_model, reference_forward, tiny_config

DOC_A = [12, 40, 77, 9, 150, 33, 33, 210, 18, 95, 61, 120, 44]
DOC_B = [200, 201, 15, 88, 17, 250, 3, 140, 141, 99]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), 3)


@pytest.fixture(scope="module")
def batches():
    # Two documents in one row, then padding (which must count for nothing), and one alone.
    return [packed_row([DOC_A, DOC_B], 32), packed_row([DOC_B], 32)]


def reference_mass(model, mask_LR=None):
    """[L, R]: router softmax averaged over the real tokens of the `batches` fixture."""
    total, tokens = 0.0, 0
    for doc, copies in ((DOC_A, 1), (DOC_B, 2)):
        probs_LSR, _, _ = reference_forward(model, doc, mask_LR)
        total = total + copies * probs_LSR.sum(1)
        tokens += copies * len(doc)
    return total / tokens


def test_probe_matches_the_model_statistics(model, batches):
    forward = nnx.jit(lambda m, t, s, p: m(t, s, p))(
        model, *(batches[0][k] for k in ("tokens", "segment_ids", "positions")))
    out = Probe(model)(batches[0])
    np.testing.assert_allclose(out["mass_LR"], np.asarray(forward.routing.prob_sums_BR).sum(1),
                               rtol=1e-5)
    np.testing.assert_array_equal(out["tokens_L"], [len(DOC_A) + len(DOC_B)] * 2)
    _, _, ref_logits = reference_forward(model, DOC_A)
    np.testing.assert_allclose(np.asarray(forward.logits_BSV)[0, :len(DOC_A)], ref_logits,
                               rtol=1e-4,
                               atol=1e-4)


def test_global_scores_equal_the_numpy_reference(model, batches):
    subset = select.select(model, batches, 4, "global")
    ref = reference_mass(model)
    np.testing.assert_allclose(subset.scores, ref, rtol=1e-5, atol=1e-7)
    assert subset.layers == [select.top_experts(r, 3) for r in ref]
    assert subset.data["tokens"] == len(DOC_A) + 2 * len(DOC_B)


def test_layerwise_scores_layer_l_with_earlier_layers_pruned(model, batches):
    keep = 3
    subset = select.select(model, batches, keep, "layerwise")
    assert subset.method == "layerwise" and subset.keep == keep
    # Layer 0 sees nothing pruned; layer 1 sees layer 0 restricted to its chosen experts.
    mask_LR = np.ones((2, 8), bool)
    ref0 = reference_mass(model)[0]
    mask_LR[0] = False
    mask_LR[0, select.top_experts(ref0, keep - 1)] = True
    ref1 = reference_mass(model, mask_LR)[1]
    np.testing.assert_allclose(subset.scores[0], ref0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(subset.scores[1], ref1, rtol=1e-5, atol=1e-7)
    assert subset.layers == [select.top_experts(ref0, 2), select.top_experts(ref1, 2)]
    # A one-pass selection gives other layer-1 scores: this test fails if layerwise ignores
    # the pruning of earlier layers.
    unpruned = reference_mass(model)[1]
    assert np.abs(np.asarray(subset.scores[1]) - unpruned).max() > 100 * np.abs(
        np.asarray(subset.scores[1]) - ref1).max()


def test_easy_ep_scores_equal_the_numpy_reference(model, batches):
    subset = select.select(model, batches, 5, "easy_ep")
    total, tokens = 0.0, 0
    for doc, copies in ((DOC_A, 1), (DOC_B, 2)):
        total = total + copies * reference_forward(model, doc)[1]
        tokens += copies * len(doc)
    np.testing.assert_allclose(subset.scores, total / tokens, rtol=1e-4, atol=1e-8)


def test_random_is_seeded_and_needs_no_text(model):
    a = select.select(model, [], 5, "random", seed=1)
    b = select.select(model, [], 5, "random", seed=1)
    c = select.select(model, [], 5, "random", seed=2)
    assert a.layers == b.layers and a.layers != c.layers
    assert a.data["seed"] == 1 and all(len(ids) == 4 for ids in a.layers)


@pytest.mark.parametrize("keep", [0, 1, 10, -3])
def test_bad_keep_is_one_clear_error(model, batches, keep):
    with pytest.raises(subset_lib.SubsetError, match=r"2 <= K <= 9"):
        select.select(model, batches, keep, "global")


def test_unknown_method_and_empty_text(model, batches):
    with pytest.raises(subset_lib.SubsetError, match="valid: layerwise, global"):
        select.select(model, batches, 4, "magic")
    empty = [{k: v * 0 for k, v in batches[0].items()}]
    with pytest.raises(subset_lib.SubsetError, match="no token"):
        select.select(model, empty, 4, "global")
