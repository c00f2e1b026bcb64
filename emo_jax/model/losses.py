"""Losses of the EMO model as pure functions: segment-confined next-token cross-entropy, the
Switch-form load-balance loss in each balance scope, the router z-loss and the output z-loss.

This is the one place balance statistics become a loss. The statistics arrive per layer and per
row (`[L, B, R]`); summing over the row axis of a globally sharded array IS the cross-device
reduction (XLA inserts it), so the 'global' scope is the global-batch loss on any mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.model.cross_entropy import token_cross_entropy


def next_token_targets(tokens_BS, segment_ids_BS, opening_eos: int | None = None):
    """Targets and mask: position s predicts token s+1 of the same segment; padding predicts
    nothing (docs/METHOD.md section 7).

    `opening_eos`: None for `data.boundary='eos_closes'` (a segment's last token predicts
    nothing). For 'eos_opens', the eos id: a segment's last token also predicts the first token
    of the next segment of its row when that is this eos, i.e. when a document opens there
    (not when the next segment is the continuation piece of a split document).
    """
    targets_BS = jnp.concatenate([tokens_BS[:, 1:], jnp.zeros_like(tokens_BS[:, :1])], axis=1)
    next_seg_BS = jnp.concatenate(
        [segment_ids_BS[:, 1:], jnp.zeros_like(segment_ids_BS[:, :1])], axis=1)
    same_BS = next_seg_BS == segment_ids_BS
    if opening_eos is not None:
        same_BS = same_BS | ((next_seg_BS != 0) & (targets_BS == opening_eos))
    mask_BS = (segment_ids_BS != 0) & same_BS
    return targets_BS, mask_BS


def masked_sums(token_loss_BS, lse_BS, mask_BS):
    """(sum of masked token losses, sum of output z terms lse^2, number of predicted tokens),
    float32, from the per-token cross-entropy and log-sum-exp (`emo_jax/model/cross_entropy.py`)."""
    maskf_BS = mask_BS.astype(jnp.float32)
    return (jnp.sum(token_loss_BS * maskf_BS),
            jnp.sum(jnp.square(lse_BS) * maskf_BS),
            jnp.sum(maskf_BS))


def cross_entropy_sums(logits_BSV, targets_BS, mask_BS):
    """`masked_sums` of dense logits."""
    return masked_sums(*token_cross_entropy(logits_BSV, targets_BS), mask_BS)


def switch_balance_loss(counts_GR, prob_sums_GR, tokens_G, top_k: int):
    """R * sum_e f_e * P_e per group G, with f_e = count_e / (k T) (no gradient), P_e = probsum_e / T.

    A group with no tokens has loss 0.
    """
    num_routed = counts_GR.shape[-1]
    t_G1 = jnp.maximum(tokens_G, 1.0)[..., None]
    f_GR = jax.lax.stop_gradient(counts_GR) / (top_k * t_G1)
    p_GR = prob_sums_GR / t_G1
    return num_routed * jnp.sum(f_GR * p_GR, axis=-1) * (tokens_G > 0)


def _mean_over_nonempty(loss_LG, tokens_LG):
    nonempty_LG = (tokens_LG > 0).astype(jnp.float32)
    return jnp.sum(loss_LG * nonempty_LG, -1) / jnp.maximum(jnp.sum(nonempty_LG, -1), 1.0)


def balance_loss_per_layer(counts_LBR, prob_sums_LBR, tokens_LB, top_k: int, scope: str,
                           num_shards: int = 1):
    """[L] balance loss per layer, with statistics reduced over the rows as `scope` says.

    'global' / 'micro_batch': summed over all rows given (the caller decides which rows: the
    whole step, or one micro-batch). 'sequence': one loss per row, averaged. 'local': rows split
    into `num_shards` contiguous groups (one per device holding part of the batch), one loss each,
    averaged: what an implementation without the cross-device reduction would compute.
    """
    if scope in ("global", "micro_batch"):
        return switch_balance_loss(counts_LBR.sum(1), prob_sums_LBR.sum(1), tokens_LB.sum(1),
                                   top_k)
    if scope == "sequence":
        return _mean_over_nonempty(
            switch_balance_loss(counts_LBR, prob_sums_LBR, tokens_LB, top_k), tokens_LB)
    if scope == "local":
        l, b, r = counts_LBR.shape
        if b % num_shards:
            raise ValueError(f"balance_scope 'local': {b} rows do not split into {num_shards} shards")
        per = b // num_shards
        counts_LNR = counts_LBR.reshape(l, num_shards, per, r).sum(2)
        probs_LNR = prob_sums_LBR.reshape(l, num_shards, per, r).sum(2)
        tokens_LN = tokens_LB.reshape(l, num_shards, per).sum(2)
        return _mean_over_nonempty(
            switch_balance_loss(counts_LNR, probs_LNR, tokens_LN, top_k), tokens_LN)
    raise ValueError(f"unknown balance scope {scope!r}")


def grouped_balance_loss(counts_LBR, prob_sums_LBR, tokens_LB, top_k: int, groups: int):
    """[L] balance loss with the B rows given split into `groups` strided groups (group k holds
    rows k, k+groups, k+2*groups, ...: `moe.balance_group_rows`), one loss per group, averaged
    over all groups (an empty group counts as 0, as an empty micro-batch does)."""
    l, b, r = counts_LBR.shape
    if b % groups:
        raise ValueError(f"balance groups: {b} rows do not split into {groups} groups")
    counts_LGR = counts_LBR.reshape(l, b // groups, groups, r).sum(1)
    probs_LGR = prob_sums_LBR.reshape(l, b // groups, groups, r).sum(1)
    tokens_LG = tokens_LB.reshape(l, b // groups, groups).sum(1)
    return switch_balance_loss(counts_LGR, probs_LGR, tokens_LG, top_k).mean(-1)


def router_z_loss_per_layer(z_sums_LB, tokens_LB):
    """[L] mean over real tokens of logsumexp(masked router logits)^2."""
    return z_sums_LB.sum(1) / jnp.maximum(tokens_LB.sum(1), 1.0)
