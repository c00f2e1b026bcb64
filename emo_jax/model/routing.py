"""EMO routing as pure functions over arrays: router probabilities, document pools, top-k, and the
per-row statistics the balance and z-losses are formed from (docs/METHOD.md section 3).

No Flax and no meshes in here, so every step of the method can be tested on hand-made inputs.
The standard MoE is the same path with `pool_size_BN=None` (no pool).

Glossary: B rows, S positions, R routed experts, N segment slots per row (= S, the most a row can
hold), K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax.model.attention import NEG_INF


class Routing(NamedTuple):
    """What the router decided for every token of a batch, plus the balance statistics."""

    expert_idx_BSK: jax.Array  # int32 routed expert ids (meaningless where segment_ids == 0)
    weights_BSK: jax.Array  # float32 gate weights (pool-masked softmax, not renormalised); 0 at padding
    counts_BR: jax.Array  # float32 assignments per expert per row (real tokens only)
    prob_sums_BR: jax.Array  # float32 sum of pool-masked softmax per expert per row
    tokens_B: jax.Array  # float32 real tokens per row
    z_sums_B: jax.Array  # float32 sum over real tokens of logsumexp(masked logits)^2
    pool_sums_B: jax.Array  # float32 sum over the row's segments of their pool size
    segments_B: jax.Array  # float32 number of segments in the row
    probs_BSR: jax.Array  # float32 softmax over the allowed experts; 0 elsewhere, at padding


def sample_pool_sizes(key, batch: int, slots: int, pool_min: int, pool_max: int):
    """P for every (row, segment slot), uniform over the integers [pool_min, pool_max]."""
    return jax.random.randint(key, (batch, slots), pool_min, pool_max + 1, dtype=jnp.int32)


def segment_mass(probs_BSR, segment_ids_BS):
    """[B, N, R]: router-probability mass summed over each segment's tokens (slot 0 = padding)."""
    b, s, r = probs_BSR.shape
    flat_ids = (segment_ids_BS + s * jnp.arange(b)[:, None]).reshape(-1)
    mass = jax.ops.segment_sum(probs_BSR.reshape(-1, r), flat_ids, num_segments=b * s)
    return mass.reshape(b, s, r)


def document_pool_mask(probs_BSR, segment_ids_BS, pool_size_BN):
    """[B, S, R] bool: expert e is in the pool of token t's segment.

    The pool of a segment is its `pool_size` experts of largest summed probability (ties broken by
    expert id). Padding tokens get an all-False row. No gradient flows through the choice.
    """
    mass_BNR = segment_mass(jax.lax.stop_gradient(probs_BSR), segment_ids_BS)
    in_pool_BNR = top_p_mask(mass_BNR, pool_size_BN)
    in_pool_BSR = jnp.take_along_axis(in_pool_BNR, segment_ids_BS[..., None], axis=1)
    return in_pool_BSR & (segment_ids_BS != 0)[..., None]


# Up to this many experts the pool ranks come from pairwise comparisons (R^2 per segment, fused,
# about 10x faster than a sort on XLA:CPU at R=32); above it, from one value sort (R log R).
PAIRWISE_RANK_MAX_EXPERTS = 64


def top_p_mask(mass_BNR, p_BN):
    """[B, N, R] bool: the p largest entries of each mass row, ties going to the lower expert id
    (exactly the first p of a stable descending sort); p is clipped to [1, R]."""
    r = mass_BNR.shape[-1]
    p_BN1 = jnp.clip(p_BN, 1, r)[..., None]
    if r <= PAIRWISE_RANK_MAX_EXPERTS:
        # rank[e] = #experts ahead of e: larger mass, or equal mass and a lower id.
        ahead_BNRR = (mass_BNR[..., None, :] > mass_BNR[..., :, None]) | (
            (mass_BNR[..., None, :] == mass_BNR[..., :, None]) & jnp.tri(r, k=-1, dtype=bool))
        return jnp.sum(ahead_BNRR, axis=-1) < p_BN1
    # The p-th largest value is the threshold: everything above it is in, and of the entries
    # equal to it, the first (p - #above) by expert id.
    desc_BNR = -jnp.sort(-mass_BNR, axis=-1)
    threshold_BN1 = jnp.take_along_axis(desc_BNR, p_BN1 - 1, axis=-1)
    above_BNR = mass_BNR > threshold_BN1
    tied_BNR = mass_BNR == threshold_BN1
    tied_before_BNR = jnp.cumsum(tied_BNR, axis=-1) - tied_BNR
    room_BN1 = p_BN1 - jnp.sum(above_BNR, axis=-1, keepdims=True)
    return above_BNR | (tied_BNR & (tied_before_BNR < room_BN1))


def route(logits_BSR, segment_ids_BS, top_k: int, pool_size_BN=None, expert_mask_R=None):
    """Routes every token: optional document pool, masked softmax, top-k (docs/METHOD.md §3).

    Args:
      logits_BSR: float32 router logits.
      segment_ids_BS: int32, 0 = padding.
      top_k: routed experts per token.
      pool_size_BN: int32 pool size per row and segment slot, or None for the standard MoE.
      expert_mask_R: optional bool, experts that exist (a subset applied by masking); the softmax
        renormalises over them, as physically removing the others would.
    """
    logits_BSR = logits_BSR.astype(jnp.float32)
    real_BS = segment_ids_BS != 0
    allowed_BSR = jnp.broadcast_to(real_BS[..., None], logits_BSR.shape)
    if expert_mask_R is not None:
        allowed_BSR = allowed_BSR & expert_mask_R
    if pool_size_BN is not None:
        probs_BSR = jax.nn.softmax(jnp.where(allowed_BSR, logits_BSR, NEG_INF), axis=-1)
        allowed_BSR = allowed_BSR & document_pool_mask(probs_BSR, segment_ids_BS, pool_size_BN)
    masked_BSR = jnp.where(allowed_BSR, logits_BSR, NEG_INF)
    scores_BSR = jax.nn.softmax(masked_BSR, axis=-1) * allowed_BSR
    weights_BSK, expert_idx_BSK = jax.lax.top_k(scores_BSR, top_k)
    realf_BS = real_BS.astype(jnp.float32)
    weights_BSK = weights_BSK * realf_BS[..., None]

    # An assignment of weight 0 (padding, or fewer than top_k experts allowed) is no assignment:
    # it is neither counted nor dispatched.
    chosen_BSK = (weights_BSK > 0).astype(jnp.float32)
    onehot_BSKR = jax.nn.one_hot(expert_idx_BSK, logits_BSR.shape[-1], dtype=jnp.float32)
    counts_BR = jnp.einsum("bskr,bsk->br", onehot_BSKR, chosen_BSK)
    lse_BS = jax.nn.logsumexp(masked_BSR, axis=-1)
    if pool_size_BN is None:
        pool_sums_B = jnp.zeros(realf_BS.shape[:1], jnp.float32)
        segments_B = pool_sums_B
    else:
        present_BN = segment_presence(segment_ids_BS)
        pool_sums_B = jnp.sum(present_BN * jnp.minimum(pool_size_BN, logits_BSR.shape[-1]), -1)
        segments_B = jnp.sum(present_BN, -1)
    return Routing(
        expert_idx_BSK=expert_idx_BSK.astype(jnp.int32),
        weights_BSK=weights_BSK,
        counts_BR=jax.lax.stop_gradient(counts_BR),
        prob_sums_BR=jnp.einsum("bsr,bs->br", scores_BSR, realf_BS),
        tokens_B=jnp.sum(realf_BS, -1),
        # where, not a product: lse is about -1e30 at padding and its square overflows to inf.
        z_sums_B=jnp.sum(jnp.where(real_BS, jnp.square(lse_BS), 0.0), -1),
        pool_sums_B=pool_sums_B.astype(jnp.float32),
        segments_B=segments_B.astype(jnp.float32),
        probs_BSR=scores_BSR,
    )


def segment_presence(segment_ids_BS):
    """[B, N] float32: 1 where segment slot n (1..S-1) occurs in the row; slot 0 (padding) is 0."""
    b, s = segment_ids_BS.shape
    present = jnp.zeros((b, s), jnp.float32).at[jnp.arange(b)[:, None], segment_ids_BS].set(1.0)
    return present.at[:, 0].set(0.0)
