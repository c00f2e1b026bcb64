"""emo_jax/model/grouped_matmul.py: the 'blocked' grouped SwiGLU run in chunks of blocks equals
the unchunked one and the ragged_dot reference (values and gradients), and holds fewer
per-block weight copies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model.grouped_matmul import grouped_swiglu, num_blocks

GROUPS = [5, 0, 9, 1, 0, 4, 13, 2]  # 34 of 40 rows live, empty groups included


def _inputs(a=40, d=16, f=8, r=len(GROUPS), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(a, d)).astype(np.float32))
    ws = [jnp.asarray(0.3 * rng.normal(size=s).astype(np.float32))
          for s in ((r, d, f), (r, d, f), (r, f, d))]
    return x, jnp.asarray(GROUPS, jnp.int32), ws


def _run(impl, chunk_blocks=0, dtype="float32", block=4):
    x, group_sizes, ws = _inputs()
    proj = jnp.cos(jnp.arange(x.shape[1], dtype=jnp.float32))

    def loss(x, ws):
        y, rows = grouped_swiglu(x, group_sizes, *ws, impl=impl, block_size=block,
                                 compute_dtype=dtype, chunk_blocks=chunk_blocks)
        return jnp.sum(y.astype(jnp.float32) * proj), (y, rows)

    (_, (y, rows)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, ws)
    return y, rows, grads


@pytest.mark.parametrize("chunk_blocks", [1, 3, 7, 18, 100])
def test_chunked_blocked_matches_unchunked_and_ragged_dot(chunk_blocks):
    y_ref, rows_ref, g_ref = _run("ragged_dot")
    y_full, rows_full, g_full = _run("blocked")
    y, rows, g = _run("blocked", chunk_blocks)
    np.testing.assert_allclose(y, y_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert not np.asarray(y)[sum(GROUPS):].any()
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(g_full), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    nb = num_blocks(len(GROUPS), 40, 4)  # 10 + 8 = 18 worst-case blocks
    cb = chunk_blocks if chunk_blocks < nb else nb
    assert int(rows_full) == nb * 4 and int(rows) == -(-nb // cb) * cb * 4


def test_chunked_blocked_bfloat16_matches_unchunked():
    y_full, _, g_full = _run("blocked", 0, "bfloat16")
    y, _, g = _run("blocked", 4, "bfloat16")
    np.testing.assert_allclose(np.float32(y), np.float32(y_full), rtol=1e-2, atol=1e-2)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.float32(a), np.float32(b),
                                   atol=2e-2 * float(np.abs(np.float32(b)).max()))


def test_chunking_bounds_the_weight_copies():
    """Compiled temporaries of value_and_grad shrink when the blocks run in chunks."""
    a, d, f, r, bk = 4096, 256, 128, 64, 64
    sds = jax.ShapeDtypeStruct
    args = (sds((a, d), jnp.float32), sds((r,), jnp.int32), sds((r, d, f), jnp.float32),
            sds((r, d, f), jnp.float32), sds((r, f, d), jnp.float32))

    def temp(chunk_blocks):
        def loss(x, gs, wg, wu, wd):
            y, _ = grouped_swiglu(x, gs, wg, wu, wd, impl="blocked", block_size=bk,
                                  chunk_blocks=chunk_blocks)
            return jnp.sum(y)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    nb = num_blocks(r, a, bk)  # 128 blocks: 3 copies of 128 x 256 x 128 float32 = 50 MB
    full, chunked = temp(0), temp(8)
    assert full > 3 * nb * d * f * 4
    assert chunked < full / 2, (chunked, full)  # what is left: weight-gradient sums, rows


def test_megablox_in_the_interpreter_matches_ragged_dot():
    """The TPU kernel ('auto' on TPU), run in the Pallas interpreter: values and gradients equal
    the ragged_dot reference, rows past the last group give 0, empty groups included."""
    from emo_jax.model.grouped_matmul import megablox_swiglu

    x, group_sizes, ws = _inputs(a=150, d=128, f=128)
    group_sizes = jnp.asarray([40, 0, 33, 1, 0, 20, 30, 6], jnp.int32)  # 130 of 150 rows live
    proj = jnp.cos(jnp.arange(128, dtype=jnp.float32))

    def loss(fn):
        def f(x, ws):
            y = fn(x, ws)
            return jnp.sum(y * proj), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, ws)

    (_, y), g = loss(lambda x, ws: megablox_swiglu(x, group_sizes, *ws, interpret=True))
    (_, y_ref), g_ref = loss(lambda x, ws: grouped_swiglu(
        x, group_sizes, *ws, impl="ragged_dot", block_size=4)[0])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-3)  # values up to ~60
    assert not np.asarray(y[130:]).any()
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
