"""The EMO language model: token embedding, N scanned pre-norm blocks (attention + MoE), final
RMSNorm and an untied output head. Returns float32 logits and per-layer routing statistics.

Blocks are created with `nnx.vmap` (parameters stacked on a leading layer axis) and run with
`nnx.scan`, so compile time does not grow with depth. Pool sizes are drawn from an explicit PRNG
key per call: training passes `pool_key`; evaluation passes none and gets the config's fixed
`moe.eval_pool` (0 = plain top-k, as the reference serves the model).

Glossary: B rows, S positions, D d_model, V vocabulary, L layers, R routed experts, N segment
slots per row (= S).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import routing
from emo_jax.model.layers import Attention, RMSNorm, param
from emo_jax.model.moe import MoE

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}


class Block(nnx.Module):
    """h = x + Attn(RMSNorm(x)); out = h + MoE(RMSNorm(h))."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m, rngs=rngs)
        self.moe_norm = RMSNorm(m.d_model, m.norm_eps)
        self.moe = MoE(m, config.moe, rngs=rngs, rules=config.mesh.rules)

    def __call__(self, x_BSD, segment_ids_BS, positions_BS, pool_size_BN, expert_mask_R,
                 assignments: bool = False):
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), segment_ids_BS, positions_BS)
        y_BSD, stats = self.moe(self.moe_norm(h_BSD), segment_ids_BS, pool_size_BN, expert_mask_R,
                                assignments=assignments)
        return h_BSD + y_BSD, stats

    def decode(self, x_BSD, positions_BS, cache_k, cache_v, start, expert_mask_R):
        """The block on new tokens with a KV cache (no pool): (out_BSD, cache_k, cache_v,
        counts_BR: the routed assignments per expert of each row's new tokens)."""
        a_BSD, cache_k, cache_v = self.attn.decode(self.attn_norm(x_BSD), positions_BS, cache_k,
                                                   cache_v, start)
        h_BSD = x_BSD + a_BSD
        real_BS = jnp.ones(positions_BS.shape, jnp.int32)
        y_BSD, stats = self.moe(self.moe_norm(h_BSD), real_BS, None, expert_mask_R)
        return h_BSD + y_BSD, cache_k, cache_v, stats["counts"]


class Transformer(nnx.Module):
    """Decoder-only EMO MoE language model, configured by the `model.*` and `moe.*` keys."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        self.config = config
        self.embed = param(rngs, (m.vocab_size, m.d_model), ("vocab", "embed"), m.init_std)

        @nnx.split_rngs(splits=m.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std)

    def pool_sizes(self, batch: int, seq: int, pool_key):
        """[L, B, N] int32 pool sizes, or None when no pool applies."""
        moe, layers = self.config.moe, self.config.model.num_layers
        if pool_key is not None and moe.pool == "document":
            keys = jax.random.split(pool_key, layers)
            return jax.vmap(lambda k: routing.sample_pool_sizes(
                k, batch, seq, moe.pool_min, moe.pool_max))(keys)
        if pool_key is None and moe.eval_pool > 0:
            return jnp.full((layers, batch, seq), moe.eval_pool, jnp.int32)
        return None

    def __call__(self, tokens_BS, segment_ids_BS, positions_BS, *, pool_key=None,
                 expert_mask_LR=None, pool_size_LBN=None, assignments: bool = False):
        """Logits [B, S, V] (float32) and stats: dict of per-layer arrays ([L, B, R], [L, B], [L]).

        pool_key: PRNG key for training-time pool sizes (None = evaluation).
        expert_mask_LR: optional bool [L, R]: only these routed experts exist (subset by masking).
        pool_size_LBN: explicit pool sizes (tests, analysis); overrides pool_key.
        assignments: stats also hold `expert_idx_BSK` [L, B, S, K] (see MoE.__call__).
        """
        b, s = tokens_BS.shape
        m = self.config.model
        if pool_size_LBN is None:
            pool_size_LBN = self.pool_sizes(b, s, pool_key)
        x_BSD = self.embed[...][tokens_BS]
        per_layer = {"pool_size_BN": pool_size_LBN, "expert_mask_R": expert_mask_LR}

        def body(x_BSD, block, layer_inputs):
            return block(x_BSD, segment_ids_BS, positions_BS, layer_inputs["pool_size_BN"],
                         layer_inputs["expert_mask_R"], assignments)

        if m.remat != "none":
            body = nnx.remat(body, policy=_REMAT_POLICIES[m.remat])
        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        x_BSD, stats = scan(x_BSD, self.blocks, per_layer)
        return self.logits(x_BSD), stats

    def logits(self, x_BSD):
        """Final RMSNorm and output head: float32 logits [B, S, V]."""
        x_BSD = self.final_norm(x_BSD)
        dt = jnp.dtype(self.config.model.compute_dtype)
        logits_BSV = jnp.einsum("bsd,dv->bsv", x_BSD.astype(dt), self.head[...].astype(dt))
        return logits_BSV.astype(jnp.float32)

    def decode(self, tokens_BS, positions_BS, cache, start, *, expert_mask_LR=None,
               return_counts: bool = False):
        """Logits of S new tokens per row given a KV cache; returns (logits_BSV, new cache),
        and with `return_counts` also float32 counts_LBR: the routed assignments per layer,
        row and expert made for the new tokens (request logs).

        Every row is one document whose tokens 0..start-1 are already in `cache` (a dict of
        `k`, `v` arrays [L, B, T, K, Dh]: see emo_jax/model/decode.py); the new tokens go to
        slots start..start+S-1. Inference routing: plain top-k, no pool; `expert_mask_LR`
        restricts the experts as in __call__.
        """
        x_BSD = self.embed[...][tokens_BS]
        per_layer = {"k": cache["k"], "v": cache["v"], "expert_mask_R": expert_mask_LR}

        def body(x_BSD, block, layer):
            x_BSD, k, v, counts_BR = block.decode(x_BSD, positions_BS, layer["k"], layer["v"],
                                                  start, layer["expert_mask_R"])
            return x_BSD, {"k": k, "v": v, "counts": counts_BR}

        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        x_BSD, out = scan(x_BSD, self.blocks, per_layer)
        cache = {"k": out["k"], "v": out["v"]}
        if return_counts:
            return self.logits(x_BSD), cache, out["counts"]
        return self.logits(x_BSD), cache
