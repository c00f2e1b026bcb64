"""The optimiser: weight decay masked off embeddings and norms, the learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.config import default_config
from emo_jax.model.transformer import Transformer
from emo_jax.model.model_config import ModelConfig
from emo_jax.train import optimizer as optim


def _small():
    c = default_config()
    c.model.d_model, c.model.num_layers, c.model.head_dim = 16, 2, 8
    c.model.qk_norm = True
    c.moe.num_experts, c.moe.num_shared_experts, c.moe.top_k = 5, 1, 2
    c.moe.expert_hidden, c.moe.pool_min, c.moe.pool_max = 8, 2, 4
    return c


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path if getattr(k, "key", None) != "value"
                     and getattr(k, "name", None) != "value"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_skips_embeddings_and_norms():
    config = _small()
    model_config = ModelConfig.from_config(config)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))),
                         nnx.Param)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract)
    mask = _flat(optim.weight_decay_mask(params))
    no_decay = {name for name, decays in mask.items() if not decays}
    assert no_decay == {"embed", "final_norm/scale", "blocks/attn_norm/scale",
                        "blocks/moe_norm/scale", "blocks/attn/q_norm/scale",
                        "blocks/attn/k_norm/scale"}
    for name in ("head", "blocks/attn/wq", "blocks/moe/router", "blocks/moe/w_gate",
                 "blocks/moe/shared_down"):
        assert mask[name], name
    # The real optimiser: with zero gradients only decayed parameters move.
    config.train.warmup_steps, config.train.clip_norm = 0, 0.0
    tx = optim.make_optimizer(config)

    @jax.jit
    def first_update(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        return tx.update(grads, tx.init(params), params)[0]

    updates = first_update(params)
    for name, update in _flat(updates).items():
        moved = bool(jnp.any(update != 0))
        assert moved == mask[name], name


def _schedule(schedule, **keys):
    c = default_config()
    c.train.lr, c.train.steps, c.train.warmup_steps = 1.0, 100, 10
    c.train.final_lr_fraction, c.train.schedule = 0.1, schedule
    for k, v in keys.items():
        c.train[k] = v
    f = optim.learning_rate_schedule(c)
    return np.array([float(f(n)) for n in range(c.train.steps)])


def test_schedule_warmup_then_cosine_to_final_fraction():
    lr = _schedule("cosine")
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)  # first update moves
    assert lr[10] == pytest.approx(1.0)
    assert np.all(np.diff(lr[10:]) <= 1e-7)  # decays monotonically
    assert lr[55] == pytest.approx(0.55, abs=1e-6)  # cosine midpoint: (1 + 0.1) / 2
    assert lr[99] == pytest.approx(0.1, abs=1e-3)


def test_schedule_linear_constant_and_anneal():
    lin = _schedule("linear")
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(0.55, abs=1e-6)
    np.testing.assert_allclose(np.diff(lin[11:]), -0.9 / 90, rtol=1e-4)
    const = _schedule("constant")
    np.testing.assert_allclose(const[9:], 1.0)
    wsd = _schedule("constant", anneal_steps=20)  # warm-up, stable, anneal to 0
    np.testing.assert_allclose(wsd[9:80], 1.0)
    np.testing.assert_allclose(wsd[80:], 1.0 - np.arange(20) / 20, rtol=1e-5)
    cos = _schedule("cosine", anneal_steps=20)
    assert cos[79] == pytest.approx(0.1, abs=1e-3) and cos[80] == pytest.approx(0.1)
    assert cos[99] == pytest.approx(0.1 / 20, rel=1e-4)
