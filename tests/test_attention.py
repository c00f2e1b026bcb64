"""emo_jax/model/attention.py: every implementation equals the dense reference (values and
gradients of q, k, v) on packed rows with several documents and padding; 'auto' resolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model import attention as A


def _segments(b, s):
    """Packed rows: several documents of uneven lengths, then padding (id 0)."""
    seg = np.zeros((b, s), np.int32)
    rng = np.random.default_rng(0)
    for r in range(b):
        pos, doc = 0, 1
        end = s - (r * 7) % 23  # some rows end in padding
        while pos < end:
            n = int(rng.integers(1, max(2, s // 3)))
            seg[r, pos:min(end, pos + n)] = doc
            pos, doc = pos + n, doc + 1
    return jnp.asarray(seg)


def _qkv(b, s, h, kv, dh, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (b, s, h, dh)).astype(dtype),
            jax.random.normal(ks[1], (b, s, kv, dh)).astype(dtype),
            jax.random.normal(ks[2], (b, s, kv, dh)).astype(dtype))


def _value_and_grads(fn, q, k, v):
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    out = fn(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _dense(seg):
    return lambda q, k, v: A.dense_attention(q, k, v, A.segment_causal_mask(seg))


@pytest.mark.parametrize("s,qc,kc", [(96, 32, 32), (100, 32, 16), (70, 16, 48), (40, 512, 512)])
def test_chunked_matches_dense_float32(s, qc, kc):
    q, k, v = _qkv(2, s, 4, 2, 16)  # grouped heads: 4 query heads over 2 key/value heads
    seg = _segments(2, s)
    ref, ref_g = _value_and_grads(_dense(seg), q, k, v)
    out, g = _value_and_grads(
        lambda q, k, v: A.chunked_attention(q, k, v, seg, q_chunk=qc, kv_chunk=kc), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-5)
    # Padding queries output exactly zero.
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)


def test_chunked_matches_dense_bfloat16():
    q, k, v = _qkv(2, 64, 4, 4, 32, jnp.bfloat16)
    seg = _segments(2, 64)
    ref, ref_g = _value_and_grads(_dense(seg), q, k, v)
    out, g = _value_and_grads(
        lambda q, k, v: A.chunked_attention(q, k, v, seg, q_chunk=16, kv_chunk=16), q, k, v)
    assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=3e-2, rtol=3e-2)
    for a, r in zip(g, ref_g):
        scale = float(np.abs(np.float32(r)).max())
        np.testing.assert_allclose(np.float32(a), np.float32(r), atol=3e-2 * scale)


def test_attention_dispatch_and_splash_in_interpreter():
    q, k, v = _qkv(1, 128, 4, 2, 128)
    seg = _segments(1, 128)
    ref, ref_g = _value_and_grads(_dense(seg), q, k, v)
    for impl, kw in (("dense", {}), ("chunked", {"chunk": 32}), ("splash", {"interpret": True})):
        out, g = _value_and_grads(
            lambda q, k, v: A.attention(q, k, v, seg, impl=impl, **kw), q, k, v)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=impl)
        for a, r in zip(g, ref_g):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-5, err_msg=impl)


def test_splash_runs_per_device_under_a_mesh():
    """XLA cannot partition a Pallas kernel: under a mesh, splash runs per device (shard_map over
    the batch axes) and still equals the dense reference on every row."""
    q, k, v = _qkv(8, 128, 2, 1, 128)
    seg = _segments(8, 128)
    ref = _dense(seg)(q, k, v)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, seg: A.attention(q, k, v, seg, impl="splash",
                                                      interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="splash runs on TPU")
def test_splash_refuses_to_run_off_tpu():
    q, k, v = _qkv(1, 128, 2, 2, 128)
    with pytest.raises(ValueError, match="only on TPU"):
        A.attention(q, k, v, _segments(1, 128), impl="splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_matches_dense_on_gpu():
    q, k, v = _qkv(2, 256, 4, 4, 64, jnp.bfloat16)
    seg = _segments(2, 256)
    ref, ref_g = _value_and_grads(_dense(seg), q, k, v)
    out, g = _value_and_grads(lambda q, k, v: A.attention(q, k, v, seg, impl="cudnn"), q, k, v)
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=3e-2, rtol=3e-2)
    for a, r in zip(g, ref_g):
        scale = float(np.abs(np.float32(r)).max())
        np.testing.assert_allclose(np.float32(a), np.float32(r), atol=3e-2 * scale)


def test_segment_runs_packed_layout():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]], jnp.int32)
    offsets, lengths = A.segment_runs(seg, max_segments=5)
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1, -1], [0, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2, -1], [8, -1, -1, -1, -1]])


def test_auto_resolution_per_backend():
    assert A.resolve_attention_impl("auto", "tpu") == "splash"
    assert A.resolve_attention_impl("auto", "gpu") == "chunked"
    assert A.resolve_attention_impl("auto", "cpu") == "dense"
    assert A.resolve_attention_impl("auto", "cpu", seq_len=256) == "dense"
    assert A.resolve_attention_impl("auto", "cpu", seq_len=1024) == "dense"
    assert A.resolve_attention_impl("auto", "cpu", seq_len=4096) == "chunked"
    for impl in ("dense", "chunked", "cudnn", "splash"):
        assert A.resolve_attention_impl(impl, "cpu") == impl
    with pytest.raises(ValueError, match="valid: auto, dense, chunked, cudnn, splash"):
        A.resolve_attention_impl("flash", "cpu")


def test_chunked_rejects_bad_shapes():
    q, k, v = _qkv(1, 16, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        A.chunked_attention(q, k, v, jnp.ones((1, 16), jnp.int32))
