"""`model.init`: 'normal' (default) or 'truncated_normal' (the reference: N(0, std^2) cut at
+-3 std, not rescaled), for every weight matrix of the model."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from emo_jax.config import default_config, validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer

# std of N(0, 1) truncated at +-3: sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)).
TRUNCATED_STD = 0.986560


def _matrices(init):
    c = default_config()
    c.model.init = init
    c.moe.num_shared_experts = 1
    validate(c)
    model = Transformer(ModelConfig.from_config(c), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    mats = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves if np.ndim(v) >= 2
            and "scale" not in jax.tree_util.keystr(p)}
    return c.model.init_std, mats


def test_truncated_normal_stays_within_three_std_with_the_right_std():
    std, mats = _matrices("truncated_normal")
    assert len(mats) >= 10  # embed, head, attention, router, routed and shared experts
    for name, x in mats.items():
        assert np.abs(x).max() <= 3 * std * (1 + 1e-6), name
        assert abs(x.mean()) < 0.05 * std, name
        np.testing.assert_allclose(x.std(), TRUNCATED_STD * std, rtol=0.03, err_msg=name)
    everything = np.concatenate([x.ravel() for x in mats.values()])
    np.testing.assert_allclose(everything.std(), TRUNCATED_STD * std, rtol=0.005)


def test_normal_is_the_default_and_not_truncated():
    assert default_config().model.init == "normal"
    std, mats = _matrices("normal")
    everything = np.concatenate([x.ravel() for x in mats.values()])
    assert np.abs(everything).max() > 3 * std
    np.testing.assert_allclose(everything.std(), std, rtol=0.005)
