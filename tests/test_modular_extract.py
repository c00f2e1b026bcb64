"""Physical pruning: the extracted model computes what the masked full model computes, its
parameters shrink by exactly the removed experts, and it round-trips through a checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.modular import extract, select, subset as subset_lib

from modular_helpers import packed_row, random_model, tiny_config

ROW = packed_row([[12, 40, 77, 9, 150, 33, 33, 210, 18, 95, 61], [200, 201, 15, 88, 17]], 24)


@nnx.jit
def _forward(model, tokens, segment_ids, positions, mask_LR):
    return model(tokens, segment_ids, positions, expert_mask_LR=mask_LR).logits_BSV


def logits_of(model, mask_LR=None):
    out = _forward(model, *(jnp.asarray(ROW[k]) for k in ("tokens", "segment_ids", "positions")),
                   None if mask_LR is None else jnp.asarray(mask_LR))
    return np.asarray(out)[ROW["segment_ids"] != 0]


@pytest.mark.parametrize("moe, keep", [
    (dict(), 4),  # 1 shared + 3 routed, top_k 2 stays 2
    (dict(), 2),  # 1 shared + 1 routed: top_k becomes min(2, 1) = 1
    (dict(num_shared_experts=0, top_k=3), 5),  # no shared expert
    (dict(num_shared_experts=2), 5),  # 2 shared (and their router) + 3 routed
])
def test_extracted_logits_equal_the_masked_full_model(moe, keep):
    config = tiny_config(**moe)
    model = random_model(config, 5)
    subset = select.select(model, [], keep, "random", seed=keep)
    small, small_config, report = extract.extract(model, config, subset)
    assert small.config.num_experts == keep
    assert small_config.moe.top_k == min(config.moe.top_k, keep - config.moe.num_shared_experts)
    assert small.config.num_experts == keep
    np.testing.assert_allclose(logits_of(small), logits_of(model, subset.mask()), rtol=1e-5,
                               atol=1e-6)
    # And the restriction matters: the unmasked full model differs.
    assert np.abs(logits_of(model) - logits_of(small)).max() > 1e-3

    m, e = config.model, config.moe
    removed = m.num_layers * (e.num_experts - keep)  # routed experts removed, all layers
    per_expert = 3 * m.d_model * e.expert_hidden + m.d_model  # SwiGLU weights + router column
    assert report["params_before"] - report["params_after"] == removed * per_expert
    assert report["bytes_before"] - report["bytes_after"] == 4 * removed * per_expert
    assert report["bytes_after"] == extract.param_stats(small)["bytes"]
    # The shared experts and their own router are kept whole.
    for name in ("shared_down",) * (e.num_shared_experts > 0) + ("shared_router",) * (
            e.num_shared_experts > 1):
        np.testing.assert_array_equal(getattr(small.blocks.moe, name)[...],
                                      getattr(model.blocks.moe, name)[...])
    # The kept experts' weights are the full model's, in ascending id order.
    for layer, ids in enumerate(subset.layers):
        np.testing.assert_array_equal(small.blocks.moe.w_up[...][layer],
                                      model.blocks.moe.w_up[...][layer][np.asarray(ids)])


def test_subset_of_another_model_is_refused():
    model = random_model(tiny_config(), 0)
    other = random_model(tiny_config(num_experts=7, pool_max=6), 0)
    subset = select.select(other, [], 3, "random")
    with pytest.raises(subset_lib.SubsetError, match=r"moe.num_experts=7 there but 9 here"):
        extract.extract(model, tiny_config(), subset)


def test_extracted_checkpoint_restores(tmp_path):
    from emo_jax.modular.runtime import load_model
    from emo_jax.model_files import save_model

    config = tiny_config()
    model = random_model(config, 2)
    subset = select.select(model, [ROW], 5, "global")
    small, small_config, report = extract.extract(model, config, subset)
    save_model(str(tmp_path / "small"), small, small_config, {"extract": report})
    restored, config, metadata = load_model(str(tmp_path / "small"))
    assert config.moe.num_experts == 5 and metadata["extract"] == report
    np.testing.assert_array_equal(logits_of(restored), logits_of(small))
    with pytest.raises(subset_lib.SubsetError, match="another model"):
        subset.check_model(config, restored)
