"""Dense building blocks of the Transformer: parameters, RMSNorm, RoPE and the attention layer
(its math, in every implementation, is in `attention.py`).

Every parameter carries `logical_axes` metadata (names such as 'embed', 'heads', 'expert');
`emo_jax.parallel` maps them to mesh axes through the rules in the config, so the layout of a
model on a device mesh is a config edit. Nothing here knows about meshes.

Glossary of shape letters: B batch rows, S sequence, D d_model, H query heads, K key/value
heads, G query heads per key/value head, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import attention
from emo_jax.model.model_config import ModelConfig


def param(rngs: nnx.Rngs, shape, axes, std: float, init: str = "normal") -> nnx.Param:
    """A float32 parameter tagged with its logical axis names, drawn from N(0, std^2)
    (`init='normal'`) or from N(0, std^2) truncated at +-3 std (`'truncated_normal'`, the
    reference's trunc_normal_: not rescaled, so its std is 0.9866 std). `model.init`."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "truncated_normal":
        value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...]).astype(x.dtype)


def rope(x_BSHDh, positions_BS, theta: float):
    """Rotary position embedding, rotate-half convention (the HF one).

    Dimension i of the first half of each head pairs with dimension i of the second half and is
    rotated by positions * theta^(-2i/Dh).
    """
    half = x_BSHDh.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BSHDh.shape[-1])
    angles_BSF = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles_BSF)[:, :, None, :], jnp.sin(angles_BSF)[:, :, None, :]
    x1, x2 = x_BSHDh[..., :half].astype(jnp.float32), x_BSHDh[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BSHDh.dtype)


class Attention(nnx.Module):
    """Multi-head (or grouped-query) attention, causal and confined to one document segment."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, cfg.init)
        self.wk = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, cfg.init)
        self.wv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, cfg.init)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std, cfg.init)
        self.q_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.impl, self.chunk = cfg.attention, cfg.attention_chunk

    def __call__(self, x_BSD, segment_ids_BS, positions_BS, kv_cache=None):
        """Attention output [B, S, D], and the updated (cache_k, cache_v) when given a cache.

        Without a cache: causal attention confined to each segment (packed documents never see
        each other; segment id 0 is padding). With `kv_cache = (cache_k_BTKDh, cache_v_BTKDh,
        start)`: every row is one document whose tokens 0..start-1 are already in the cache;
        the S new tokens are written to slots start..start+S-1 and attend to slots 0..position.
        The cache never grows (T is fixed when it is made), so a decoding step costs the same at
        every length.
        """
        q_BSHDh, k_BSKDh, v_BSKDh = self._qkv(x_BSD, positions_BS)
        if kv_cache is None:
            out_BSHDh = attention.attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS,
                                            impl=self.impl, chunk=self.chunk)
            return self._out(out_BSHDh), None
        cache_k_BTKDh, cache_v_BTKDh, start = kv_cache
        at = (0, start, 0, 0)
        cache_k_BTKDh = jax.lax.dynamic_update_slice(
            cache_k_BTKDh, k_BSKDh.astype(cache_k_BTKDh.dtype), at)
        cache_v_BTKDh = jax.lax.dynamic_update_slice(
            cache_v_BTKDh, v_BSKDh.astype(cache_v_BTKDh.dtype), at)
        slots_T = jnp.arange(cache_k_BTKDh.shape[1])
        mask_B1ST = (slots_T <= positions_BS[:, :, None])[:, None]
        out_BSHDh = attention.dense_attention(q_BSHDh, cache_k_BTKDh.astype(q_BSHDh.dtype),
                                              cache_v_BTKDh.astype(q_BSHDh.dtype), mask_B1ST)
        return self._out(out_BSHDh), (cache_k_BTKDh, cache_v_BTKDh)

    def _qkv(self, x_BSD, positions_BS):
        """Queries, keys and values in the compute dtype, normed (qk_norm) and rotated."""
        dt = self.compute_dtype
        x_BSD = x_BSD.astype(dt)
        q_BSHDh = jnp.einsum("bsd,dhk->bshk", x_BSD, self.wq[...].astype(dt))
        k_BSKDh = jnp.einsum("bsd,dhk->bshk", x_BSD, self.wk[...].astype(dt))
        v_BSKDh = jnp.einsum("bsd,dhk->bshk", x_BSD, self.wv[...].astype(dt))
        if self.q_norm is not None:
            q_BSHDh, k_BSKDh = self.q_norm(q_BSHDh), self.k_norm(k_BSKDh)
        q_BSHDh = rope(q_BSHDh, positions_BS, self.rope_theta)
        k_BSKDh = rope(k_BSKDh, positions_BS, self.rope_theta)
        return q_BSHDh, k_BSKDh, v_BSKDh

    def _out(self, out_BSHDh):
        dt = self.compute_dtype
        return jnp.einsum("bshk,hkd->bsd", out_BSHDh, self.wo[...].astype(dt))
