"""The EMO language model: token embedding, N scanned pre-norm blocks (attention + MoE), final
RMSNorm and an untied output head.

`Transformer.__call__` is the one forward. Training, evaluation, expert selection, analysis and
generation all run it; they differ only in what they pass:

  pool_key        training: document-pool sizes are drawn from this PRNG key (moe.pool='document')
  pooled          training: False (or a traced False) routes this step without pools
                  (the last `moe.pool_off_fraction` of training)
  pool_size_LBN   explicit pool sizes (tests, analysis); without either, evaluation routing
                  (`moe.eval_pool`; 0 = plain top-k, as the reference serves the model)
  use_eval_pool   False: routing as served (plain top-k) even where moe.eval_pool is set
  expert_mask_LR  bool [L, R]: only these routed experts exist (a subset applied by masking);
                  a model with `moe.experts_per_layer` adds its own mask of the padding
  cache           a KVCache: incremental decoding (one document per row, no pool)
  capture         names of per-layer intermediates to return (`emo_jax.model.moe.CAPTURES`)
  targets_BS      also return each position's cross-entropy against these ids and the logits'
                  log-sum-exp; with `model.loss_chunk` > 0 the output head is fused with the
                  cross-entropy chunk by chunk and the [B, S, V] logits are never formed

It returns a `ModelOutput`: logits, a typed per-layer `RoutingStats`, the captured
intermediates, the updated cache and the token losses. Blocks are created with `nnx.vmap`
(parameters stacked on a leading layer axis) and run with `nnx.scan`, so compile time does not
grow with depth.

Glossary: B rows, S positions, D d_model, V vocabulary, L layers, R routed experts, N segment
slots per row (= S), T cache slots, K key/value heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import cross_entropy, routing
from emo_jax.model.layers import Attention, RMSNorm, param
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.moe import CAPTURES, MoE, RoutingStats

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for T fixed slots: [L, B, T, K, Dh] in the compute dtype."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        dt = jnp.dtype(config.compute_dtype)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    """What the forward returns; per-layer arrays carry a leading [L] axis."""

    logits_BSV: jax.Array | None  # float32 (None when the head is fused with the loss)
    routing: RoutingStats  # per layer and row
    captured: dict  # the requested intermediates, e.g. 'router_probs_BSR' -> [L, B, S, R]
    cache: KVCache | None = None  # the updated cache when one was given
    token_loss_BS: jax.Array | None = None  # float32 cross-entropy per position (targets_BS)
    lse_BS: jax.Array | None = None  # float32 log-sum-exp of each position's logits


class Block(nnx.Module):
    """h = x + Attn(RMSNorm(x)); out = h + MoE(RMSNorm(h))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, rngs=rngs)
        self.moe_norm = RMSNorm(config.d_model, config.norm_eps)
        self.moe = MoE(config, rngs=rngs)

    def __call__(self, x_BSD, segment_ids_BS, positions_BS, pool_size_BN, expert_mask_R,
                 kv_cache=None, capture: tuple[str, ...] = ()):
        """(out_BSD, RoutingStats, captured dict, updated (cache_k, cache_v) or None)."""
        a_BSD, new_kv = self.attn(self.attn_norm(x_BSD), segment_ids_BS, positions_BS, kv_cache)
        h_BSD = x_BSD + a_BSD
        y_BSD, stats, captured = self.moe(self.moe_norm(h_BSD), segment_ids_BS, pool_size_BN,
                                          expert_mask_R, capture=capture)
        out_BSD = h_BSD + y_BSD
        if "expert_contrib" in capture:
            h_BSD32, out_BSD32 = h_BSD.astype(jnp.float32), out_BSD.astype(jnp.float32)
            cos_BS = jnp.sum(h_BSD32 * out_BSD32, -1) / jnp.maximum(
                jnp.linalg.norm(h_BSD32, axis=-1) * jnp.linalg.norm(out_BSD32, axis=-1), 1e-30)
            captured["moe_turn_BS"] = 1.0 - cos_BS
        return out_BSD, stats, captured, new_kv


class Transformer(nnx.Module):
    """Decoder-only EMO MoE language model of one `ModelConfig`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError("Transformer takes a ModelConfig; build one from a run config with "
                            "ModelConfig.from_config(config)")
        self.config = config
        self.embed = param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"),
                           config.init_std, config.init)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        if config.ragged:  # the padding of the expert stacks is zero (and never routed)
            exists_LR = jnp.asarray(config.existing_experts_LR())
            moe = self.blocks.moe
            moe.router[...] = moe.router[...] * exists_LR[:, None, :]
            for w in (moe.w_gate, moe.w_up, moe.w_down):
                w[...] = w[...] * exists_LR[:, :, None, None]
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"),
                          config.init_std, config.init)

    def pool_sizes(self, batch: int, seq: int, pool_key, pooled=True):
        """[L, B, N] int32 pool sizes, or None when no pool applies. `pooled` (a bool, or a
        traced bool scalar) False makes every training pool all routed experts: plain top-k."""
        c = self.config
        if pool_key is not None and c.pool == "document":
            keys = jax.random.split(pool_key, c.num_layers)
            sizes_LBN = jax.vmap(lambda k: routing.sample_pool_sizes(
                k, batch, seq, c.pool_min, c.pool_max))(keys)
            if pooled is True:
                return sizes_LBN
            return jnp.where(pooled, sizes_LBN, c.routed_experts)
        if pool_key is None and c.eval_pool > 0:
            return jnp.full((c.num_layers, batch, seq), c.eval_pool, jnp.int32)
        return None

    def __call__(self, tokens_BS, segment_ids_BS=None, positions_BS=None, *, pool_key=None,
                 pool_size_LBN=None, expert_mask_LR=None, cache: KVCache | None = None,
                 cache_index=0, use_eval_pool: bool = True, capture: tuple[str, ...] = (),
                 targets_BS=None, pooled=True) -> ModelOutput:
        """The forward (module docstring). segment_ids_BS None: every token is real and each row
        is one document; positions_BS None: 0..S-1 (+ cache_index with a cache). With a cache,
        the S new tokens go to slots cache_index..cache_index+S-1 and routing has no pool."""
        unknown = set(capture) - set(CAPTURES)
        if unknown:
            raise ValueError(f"unknown capture {sorted(unknown)}; valid: {', '.join(CAPTURES)}")
        b, s = tokens_BS.shape
        if segment_ids_BS is None:
            segment_ids_BS = jnp.ones((b, s), jnp.int32)
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + cache_index, (b, s))
        if pool_size_LBN is None and cache is None and (use_eval_pool or pool_key is not None):
            pool_size_LBN = self.pool_sizes(b, s, pool_key, pooled)
        if self.config.ragged:  # experts beyond a layer's count do not exist
            exists_LR = jnp.asarray(self.config.existing_experts_LR())
            expert_mask_LR = exists_LR if expert_mask_LR is None else expert_mask_LR & exists_LR
        per_layer = {"pool_size_BN": pool_size_LBN, "expert_mask_R": expert_mask_LR,
                     "k": None if cache is None else cache.k,
                     "v": None if cache is None else cache.v}
        capture = tuple(capture)

        def body(x_BSD, block, layer):
            kv = None if layer["k"] is None else (layer["k"], layer["v"], cache_index)
            x_BSD, stats, captured, new_kv = block(
                x_BSD, segment_ids_BS, positions_BS, layer["pool_size_BN"],
                layer["expert_mask_R"], kv, capture)
            return x_BSD, (stats, captured, new_kv)

        if self.config.remat != "none":
            body = nnx.remat(body, policy=_REMAT_POLICIES[self.config.remat])
        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        x_BSD = self.embed[...][tokens_BS]
        x_BSD, (stats, captured, new_kv) = scan(x_BSD, self.blocks, per_layer)
        new_cache = None if new_kv is None else KVCache(*new_kv)
        out = ModelOutput(None, stats, captured, new_cache)
        x_BSD = self.final_norm(x_BSD)
        c = self.config
        if targets_BS is not None and c.loss_chunk > 0:
            out.token_loss_BS, out.lse_BS = cross_entropy.chunked_head_cross_entropy(
                x_BSD, self.head[...], targets_BS, chunk=c.loss_chunk,
                compute_dtype=c.compute_dtype)
            return out
        out.logits_BSV = cross_entropy.head_logits(x_BSD, self.head[...], c.compute_dtype)
        if targets_BS is not None:
            out.token_loss_BS, out.lse_BS = cross_entropy.token_cross_entropy(out.logits_BSV,
                                                                              targets_BS)
        return out
