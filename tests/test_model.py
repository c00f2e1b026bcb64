"""The whole EMO Transformer: segment isolation, scan/remat equivalence, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emo_jax.config import default_config, validate
from emo_jax.model.transformer import Transformer
from emo_jax.model.model_config import ModelConfig
from emo_jax.train.loss import loss_and_metrics


def tiny_config(**moe):
    c = default_config()
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    c.moe.update(num_experts=9, num_shared_experts=1, top_k=2, expert_hidden=32, pool_min=3,
                 pool_max=3, block_size=8)
    c.moe.update(**moe)
    c.data.seq_len = 48
    return validate(c)


def row(docs, seq):
    tokens, seg, pos = np.zeros(seq, np.int32), np.zeros(seq, np.int32), np.zeros(seq, np.int32)
    at = 0
    for i, d in enumerate(docs, 1):
        tokens[at:at + len(d)], seg[at:at + len(d)], pos[at:at + len(d)] = d, i, np.arange(len(d))
        at += len(d)
    return tokens, seg, pos


def test_document_logits_do_not_depend_on_packing():
    config = tiny_config()
    model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    doc = rng.integers(8, 264, 15)
    others = [rng.integers(8, 264, 11), rng.integers(8, 264, 9)]
    alone = row([doc], 48)
    packed = row([others[0], doc, others[1]], 48)
    batch = np.stack([alone, packed], 1)  # [3 fields, 2 rows, S]
    key = jax.random.key(7)  # pool sizes are fixed (pool_min == pool_max), the key is irrelevant
    forward = nnx.jit(lambda m, t, s, p: m(t, s, p, pool_key=key).logits_BSV)
    logits = forward(model, *map(jnp.asarray, batch))
    np.testing.assert_allclose(logits[0, :15], logits[1, 11:26], rtol=1e-4, atol=1e-5)
    # And the standard-MoE path too.
    model.config = ModelConfig.from_config(tiny_config(pool="none"))
    logits = forward(model, *map(jnp.asarray, batch))
    np.testing.assert_allclose(logits[0, :15], logits[1, 11:26], rtol=1e-4, atol=1e-5)


def test_remat_gives_identical_gradients():
    batch = {k: jnp.asarray(v[None]) for k, v in
             zip(("tokens", "segment_ids", "positions"), row([np.arange(8, 40), np.arange(50, 60)], 48))}
    grads = []
    for remat in ("none", "full"):
        config = tiny_config()
        config.model.remat = remat
        model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(1))
        grads.append(nnx.jit(nnx.grad(
            lambda m: loss_and_metrics(m, batch, config, jax.random.key(0))[0]))(model))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_model_learns_a_repeated_text():
    config = tiny_config(pool_min=3, pool_max=8)
    model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 3, np.uint8) + 8
    rows = [row([text[:20], text[20:44]], 48), row([text[5:45]], 48)]
    batch = {k: jnp.asarray(np.stack([r[i] for r in rows])) for i, k in
             enumerate(("tokens", "segment_ids", "positions"))}

    @nnx.jit
    def step(model, optimizer, key):
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: loss_and_metrics(m, batch, config, key), has_aux=True)(model)
        optimizer.update(model, grads)
        return metrics["cross_entropy"]

    key = jax.random.key(0)
    losses = [float(step(model, optimizer, jax.random.fold_in(key, i))) for i in range(200)]
    assert losses[0] > 4.5
    assert np.mean(losses[-10:]) < 0.5 * losses[0], losses[::20]
