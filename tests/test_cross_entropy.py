"""emo_jax/model/cross_entropy.py: the fused, chunked head + cross-entropy equals the dense
logits reference (per-token loss and log-sum-exp, and the gradients wrt x and the head of a
masked loss with an output z term)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model import losses
from emo_jax.model.cross_entropy import (chunked_head_cross_entropy, head_logits,
                                         token_cross_entropy)


def _inputs(t, d, v, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (t, d))
    head = 0.3 * jax.random.normal(ks[1], (d, v))
    targets = jax.random.randint(ks[2], (t,), 0, v)
    mask = jax.random.bernoulli(ks[3], 0.8, (t,))
    return x, head, targets, mask


def _objective(ce, w=1e-2):
    """What the training loss does with (loss_T, lse_T): masked sums, z term weighted by w."""
    def f(x, head, targets, mask):
        loss_T, lse_T = ce(x, head, targets)
        m = mask.astype(jnp.float32)
        return jnp.sum(loss_T * m) + w * jnp.sum(jnp.square(lse_T) * m)
    return f


def _dense(x, head, targets, dt=jnp.float32):
    return token_cross_entropy(head_logits(x, head, dt), targets)


def test_token_cross_entropy_matches_losses_sums():
    x, head, targets, mask = _inputs(12, 8, 40)
    logits = (x @ head).reshape(3, 4, 40)
    loss, lse = token_cross_entropy(logits, targets.reshape(3, 4))
    m = mask.reshape(3, 4)
    ce, z, n = losses.cross_entropy_sums(logits, targets.reshape(3, 4), m)
    np.testing.assert_allclose(jnp.sum(loss * m), ce, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(lse ** 2 * m), z, rtol=1e-6)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, -1), rtol=1e-6)


@pytest.mark.parametrize("t,chunk", [(64, 16), (50, 16), (37, 64), (20, 0), (33, 1)])
def test_chunked_matches_dense_float32(t, chunk):
    x, head, targets, mask = _inputs(t, 16, 300)
    ref_loss, ref_lse = _dense(x, head, targets)
    loss, lse = chunked_head_cross_entropy(x, head, targets, chunk=chunk)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)

    ref_val, ref_g = jax.value_and_grad(_objective(_dense), argnums=(0, 1))(
        x, head, targets, mask)
    fused = _objective(lambda x, h, tg: chunked_head_cross_entropy(x, h, tg, chunk=chunk))
    val, g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, head, targets, mask)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_chunked_keeps_leading_shape_and_bfloat16_compute():
    x, head, targets, mask = _inputs(48, 32, 200)
    xb, tb, mb = x.reshape(4, 12, 32), targets.reshape(4, 12), mask.reshape(4, 12)
    bf = jnp.bfloat16
    ref_loss, ref_lse = _dense(xb, head, tb, bf)
    loss, lse = chunked_head_cross_entropy(xb, head, tb, chunk=10, compute_dtype=bf)
    assert loss.shape == (4, 12) and loss.dtype == jnp.float32
    # bfloat16 logits: the matmuls of different shapes may round differently (1 ulp ~ 0.03).
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-2, atol=5e-2)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-2, atol=5e-2)
    ref_g = jax.grad(_objective(lambda x, h, t: _dense(x, h, t, bf)), argnums=(0, 1))(
        xb, head, tb, mb)
    g = jax.grad(_objective(lambda x, h, t: chunked_head_cross_entropy(
        x, h, t, chunk=10, compute_dtype=bf)), argnums=(0, 1))(xb, head, tb, mb)
    for a, r in zip(g, ref_g):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(a, r, atol=2e-2 * float(jnp.abs(r).max()))


def test_chunked_holds_at_most_one_chunk_of_logits():
    """Compiled temporaries of value_and_grad stay far below one [T, V] float32 array."""
    t, d, v, c = 2048, 64, 8192, 128
    sds = jax.ShapeDtypeStruct
    args = (sds((t, d), jnp.float32), sds((d, v), jnp.float32), sds((t,), jnp.int32),
            sds((t,), jnp.bool_))
    fused = _objective(lambda x, h, tg: chunked_head_cross_entropy(x, h, tg, chunk=c))
    temp = jax.jit(jax.value_and_grad(fused, argnums=(0, 1))).lower(*args).compile() \
        .memory_analysis().temp_size_in_bytes
    full_logits = t * v * 4
    assert temp < full_logits / 4, (temp, full_logits)
