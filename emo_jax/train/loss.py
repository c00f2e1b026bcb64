"""The training objective: cross-entropy + load balance + router z-loss + output z-loss, and the
metrics that describe routing (load ratios, unused experts, pool sizes, dropped tokens).

Pure and jit-able: `loss_and_metrics(model, batch, config, pool_key)` is what train, eval and the
distributed tests differentiate. The balance statistics of the batch given are reduced here, over
its whole row axis, which on a mesh is the cross-device reduction (see `model/losses.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.data.packing import opening_eos
from emo_jax.model import losses


def load_metrics(counts_LR, model_config) -> dict:
    """Per-layer `max_load_ratio_L` (largest expert load over the mean) and `unused_experts_L`
    of the routed assignment counts, over the experts each layer has."""
    if model_config.ragged:
        exists_LR = jnp.asarray(model_config.existing_experts_LR())
        mean_L = counts_LR.sum(-1) / jnp.asarray(model_config.layer_routed(), jnp.float32)
        unused_LR = (counts_LR == 0) & exists_LR
    else:
        mean_L, unused_LR = counts_LR.mean(-1), counts_LR == 0
    return {"max_load_ratio_L": counts_LR.max(-1) / jnp.maximum(mean_L, 1e-9),
            "unused_experts_L": jnp.sum(unused_LR, -1).astype(jnp.float32)}


def loss_and_metrics(model, batch, config, pool_key=None, *, expert_mask_LR=None,
                     num_shards: int = 1, step_counts_LR=None, step_tokens_L=None,
                     loss_scale: float = 1.0, step_predicted=None, group_tokens_L=None,
                     group_weight: float = 1.0, pooled=True):
    """Scalar loss and a dict of scalar / per-layer metrics for one (micro-)batch.

    Args:
      model: an emo_jax Transformer.
      batch: dict of int32 [B, S] `tokens`, `segment_ids`, `positions`.
      config: the full config.
      pool_key: PRNG key for training-time document pools; None evaluates (no sampling).
      pooled: False (a bool or traced bool) trains this step without document pools
        (`moe.pool_off_fraction`).
      num_shards: devices the batch rows are split over (only the 'local' scope uses it).
      step_counts_LR, step_tokens_L: balance statistics of the whole optimiser step, when this is
        one of several micro-batches and the scope is 'global': f_e then comes from the whole step
        and P_e is this micro-batch's share of the step's probability mass, so the per-micro-batch
        balance terms add up to exactly the global-batch loss.
      group_tokens_L, group_weight: with `moe.balance_group_rows` larger than a micro-batch,
        `step_counts_LR` and `group_tokens_L` are the statistics of the balance group this
        micro-batch belongs to (a union of micro-batches), and the term is weighted
        `group_weight` = 1 / the number of groups, so the terms add up to the mean of the group
        losses. Otherwise `moe.balance_group_rows` > 0 splits the rows given into strided
        groups of that many rows (`losses.grouped_balance_loss`).
      loss_scale: every term is multiplied by this (1/micro_batches when the caller sums
        micro-batch losses), except the step-global balance term, which already sums to the step's.
      step_predicted: predicted tokens of the whole step (with `step_tokens_L`, its real tokens
        per layer), when this is one of several micro-batches: the per-token means (cross-entropy,
        output z, router z) are then this micro-batch's sums over the step's totals, so the
        micro-batch losses add up to the step's loss exactly even when their token counts differ,
        and `loss_scale` applies to the balance term only ('micro_batch' and other scopes).
        Metrics `cross_entropy`, `output_z_loss`, `router_z_loss` are then such shares too.
    """
    m, moe, t = config.model, config.moe, config.train
    targets_BS, mask_BS = losses.next_token_targets(batch["tokens"], batch["segment_ids"],
                                                    opening_eos(config))
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], pool_key=pool_key,
                expert_mask_LR=expert_mask_LR, targets_BS=targets_BS, pooled=pooled)
    stats = out.routing
    ce_sum, out_z_sum, n_pred = losses.masked_sums(out.token_loss_BS, out.lse_BS, mask_BS)
    denom = jnp.maximum(n_pred if step_predicted is None else step_predicted, 1.0)
    ce, output_z = ce_sum / denom, out_z_sum / denom

    layers = m.num_layers
    if step_counts_LR is not None:
        # Global balance across micro-batches: R * sum_e f_e(step) * probsum_e(micro) / T(step).
        # (The same with a balance group's statistics and the weight of one group's mean.)
        num_routed = step_counts_LR.shape[-1]
        t_L = step_tokens_L if group_tokens_L is None else group_tokens_L
        f_LR = step_counts_LR / (moe.top_k * jnp.maximum(t_L, 1.0)[:, None])
        p_LR = stats.prob_sums_BR.sum(1) / jnp.maximum(t_L, 1.0)[:, None]
        balance_L = num_routed * jnp.sum(jax.lax.stop_gradient(f_LR) * p_LR, -1)
        if group_tokens_L is not None:
            balance_L = balance_L * group_weight
    elif moe.balance_group_rows:
        rows = batch["tokens"].shape[0]
        if rows % moe.balance_group_rows:
            raise ValueError(f"moe.balance_group_rows ({moe.balance_group_rows}) does not divide "
                             f"the {rows} rows given")
        balance_L = losses.grouped_balance_loss(
            stats.counts_BR, stats.prob_sums_BR, stats.tokens_B, moe.top_k,
            rows // moe.balance_group_rows)
    else:
        balance_L = losses.balance_loss_per_layer(
            stats.counts_BR, stats.prob_sums_BR, stats.tokens_B, moe.top_k,
            moe.balance_scope, num_shards)
    if model.config.ragged:  # r_l * sum_e f_e P_e over the experts layer l has
        balance_L = balance_L * (jnp.asarray(model.config.layer_routed(), jnp.float32)
                                 / model.config.routed_experts)
    z_tokens_LB = stats.tokens_B if step_predicted is None else step_tokens_L[:, None]
    router_z_L = losses.router_z_loss_per_layer(stats.z_sums_B, z_tokens_LB)

    balance = jnp.sum(balance_L) * (moe.balance_weight / layers)
    router_z = jnp.sum(router_z_L) * (moe.router_z_weight / layers)
    if step_counts_LR is None:  # a per-micro-batch loss is averaged like the others
        balance = loss_scale * balance
    token_scale = loss_scale if step_predicted is None else 1.0
    loss = token_scale * (ce + t.output_z_weight * output_z + router_z) + balance

    counts_LR = stats.counts_BR.sum(1)
    metrics = {
        "loss": loss,
        "cross_entropy": ce,
        "predicted_tokens": n_pred,
        "balance_loss": jnp.mean(balance_L),
        "router_z_loss": jnp.mean(router_z_L),
        "output_z_loss": output_z,
        **load_metrics(counts_LR, model.config),
        "mean_pool_size": stats.pool_sums_B.sum() / jnp.maximum(stats.segments_B.sum(), 1.0),
        "dropped_tokens": stats.dropped.sum(),
        "expert_rows": stats.rows_processed.sum(),
        "counts_LR": counts_LR,
        "tokens_L": stats.tokens_B.sum(1),
    }
    return loss, metrics
