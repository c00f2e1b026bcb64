"""Dense building blocks of the Transformer: RMSNorm, RoPE and segment-confined causal attention.

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

from emo_jax.model.model_config import ModelConfig

# A finite "minus infinity": exp() of it is exactly 0, and it never produces NaN in softmax.
NEG_INF = -1e30


def param(rngs: nnx.Rngs, shape, axes, std: float) -> nnx.Param:
    """A float32 normal-initialised parameter tagged with its logical axis names."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
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


def segment_causal_mask(segment_ids_BS):
    """[B, 1, S, S] bool: query q sees key k iff k <= q, same segment, and not padding (id 0)."""
    seq = segment_ids_BS.shape[1]
    causal_SS = jnp.tril(jnp.ones((seq, seq), bool))
    same_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    real_BS1 = (segment_ids_BS != 0)[:, :, None]
    return (causal_SS[None] & same_BSS & real_BS1)[:, None]


class Attention(nnx.Module):
    """Multi-head (or grouped-query) attention, causal and confined to one document segment."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std)
        self.q_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

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
            mask_B1SS = segment_causal_mask(segment_ids_BS)
            return self._out(attend(q_BSHDh, k_BSKDh, v_BSKDh, mask_B1SS)), None
        cache_k_BTKDh, cache_v_BTKDh, start = kv_cache
        at = (0, start, 0, 0)
        cache_k_BTKDh = jax.lax.dynamic_update_slice(
            cache_k_BTKDh, k_BSKDh.astype(cache_k_BTKDh.dtype), at)
        cache_v_BTKDh = jax.lax.dynamic_update_slice(
            cache_v_BTKDh, v_BSKDh.astype(cache_v_BTKDh.dtype), at)
        slots_T = jnp.arange(cache_k_BTKDh.shape[1])
        mask_B1ST = (slots_T <= positions_BS[:, :, None])[:, None]
        out_BSHDh = attend(q_BSHDh, cache_k_BTKDh.astype(q_BSHDh.dtype),
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


def attend(q_BSHDh, k_BTKDh, v_BTKDh, mask_B1ST):
    """Softmax attention with grouped KV heads; a query whose mask row is empty outputs zeros.

    S is the query length and T the key length (equal in training; T = cache length when
    decoding with a KV cache).
    """
    b, s, h, dh = q_BSHDh.shape
    kv = k_BTKDh.shape[2]
    q_BSKGDh = q_BSHDh.reshape(b, s, kv, h // kv, dh)
    logits_BKGST = jnp.einsum("bskgd,btkd->bkgst", q_BSKGDh, k_BTKDh).astype(jnp.float32)
    logits_BKGST = logits_BKGST / jnp.sqrt(jnp.float32(dh))
    mask_B11ST = mask_B1ST[:, :, None]
    logits_BKGST = jnp.where(mask_B11ST, logits_BKGST, NEG_INF)
    probs_BKGST = jax.nn.softmax(logits_BKGST, axis=-1) * mask_B11ST
    out_BSKGDh = jnp.einsum("bkgst,btkd->bskgd", probs_BKGST.astype(v_BTKDh.dtype), v_BTKDh)
    return out_BSKGDh.reshape(b, s, h, dh)
