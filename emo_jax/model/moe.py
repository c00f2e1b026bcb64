"""The MoE block: router, EMO document pools, dropless dispatch to SwiGLU experts, combine.

The block owns the parameters; routing decisions come from the pure functions in `routing.py`
and the expert computation from `grouped_matmul.py`. `dispatch_local` (sort by expert, grouped
matmul, unsort, weighted combine) is the one-device path and the per-shard building block of the
expert-parallel path in `moe_parallel.py`, which routing and experts take when the block is
traced under `jax.set_mesh` (the capacity dispatch there may drop: `stats['dropped']`).

Glossary: B rows, S positions, T = B*S tokens, K top-k, A = T*K assignments, R routed experts,
X shared experts, D d_model, F expert hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import moe_parallel
from emo_jax.model.grouped_matmul import grouped_swiglu
from emo_jax.model.layers import param


def sort_assignments(expert_idx_TK, weights_TK, num_experts: int):
    """Orders the T*K assignments by expert; assignments of weight 0 sort last and form no group.

    Returns (order_A: assignment index of each sorted row, group_sizes_R).
    """
    live_A = weights_TK.reshape(-1) > 0
    expert_A = jnp.where(live_A, expert_idx_TK.reshape(-1), num_experts)
    order_A = jnp.argsort(expert_A, stable=True)
    group_sizes_R = jnp.bincount(expert_A, length=num_experts + 1)[:num_experts]
    return order_A.astype(jnp.int32), group_sizes_R.astype(jnp.int32)


def dispatch_local(x_TD, expert_idx_TK, weights_TK, w_gate_RDF, w_up_RDF, w_down_RFD, *,
                   impl: str, block_size: int, compute_dtype):
    """Dropless routed-expert output y_t = sum_k w_tk Expert_{i_tk}(x_t) on one device.

    Returns (y_TD, rows_processed).
    """
    t, k = expert_idx_TK.shape
    order_A, group_sizes_R = sort_assignments(expert_idx_TK, weights_TK, w_gate_RDF.shape[0])
    token_A = order_A // k
    y_sorted_AD, rows = grouped_swiglu(
        x_TD[token_A], group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD,
        impl=impl, block_size=block_size, compute_dtype=compute_dtype)
    y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
    y_TKD = y_AD.reshape(t, k, -1).astype(jnp.float32)
    y_TD = jnp.einsum("tkd,tk->td", y_TKD, weights_TK.astype(jnp.float32))
    return y_TD, rows


def shared_swiglu(x_TD, w_gate_XDF, w_up_XDF, w_down_XFD, compute_dtype):
    """Sum of the always-on experts, each with weight 1.0."""
    dt = jnp.dtype(compute_dtype)
    x_TD = x_TD.astype(dt)
    gate_TXF = jnp.einsum("td,xdf->txf", x_TD, w_gate_XDF.astype(dt))
    up_TXF = jnp.einsum("td,xdf->txf", x_TD, w_up_XDF.astype(dt))
    return jnp.einsum("txf,xfd->td", jax.nn.silu(gate_TXF) * up_TXF,
                      w_down_XFD.astype(dt)).astype(jnp.float32)


class MoE(nnx.Module):
    """SwiGLU experts with EMO document-pool routing (or standard top-k routing)."""

    def __init__(self, model_cfg, moe_cfg, *, rngs: nnx.Rngs, rules=None):
        """rules: config.mesh.rules (how expert weights are laid out on a mesh); None = only the
        expert axis is sharded."""
        d, f, std = model_cfg.d_model, moe_cfg.expert_hidden, model_cfg.init_std
        r = moe_cfg.num_experts - moe_cfg.num_shared_experts
        x = moe_cfg.num_shared_experts
        self.router = param(rngs, (d, r), ("embed", "router"), std)
        self.w_gate = param(rngs, (r, d, f), ("expert", "embed", "expert_mlp"), std)
        self.w_up = param(rngs, (r, d, f), ("expert", "embed", "expert_mlp"), std)
        self.w_down = param(rngs, (r, f, d), ("expert", "expert_mlp", "embed"), std)
        if x:
            self.shared_gate = param(rngs, (x, d, f), ("shared", "embed", "mlp"), std)
            self.shared_up = param(rngs, (x, d, f), ("shared", "embed", "mlp"), std)
            self.shared_down = param(rngs, (x, f, d), ("shared", "mlp", "embed"), std)
        else:
            self.shared_gate = self.shared_up = self.shared_down = None
        self.top_k = moe_cfg.top_k
        self.impl = moe_cfg.grouped_matmul
        self.block_size = moe_cfg.block_size
        self.compute_dtype = model_cfg.compute_dtype
        self.dispatch = moe_cfg.dispatch
        self.capacity_factor = moe_cfg.capacity_factor
        rules = {"expert": "expert"} if rules is None else rules
        self.rules = tuple(sorted(dict(rules).items()))  # static: logical axis -> mesh axes

    def __call__(self, x_BSD, segment_ids_BS, pool_size_BN=None, expert_mask_R=None, *,
                 assignments: bool = False):
        """Returns (y_BSD float32, stats): stats holds this layer's routing statistics per row.

        assignments: also return stats['expert_idx_BSK'], the int32 routed expert of every
        assignment of every token, -1 where none was made (padding, or a weight of 0): what
        per-document audits (request logs) sum up.
        """
        b, s, d = x_BSD.shape
        logits_BSR = jnp.einsum("bsd,dr->bsr", x_BSD.astype(jnp.float32), self.router[...])
        decision = moe_parallel.route(logits_BSR, segment_ids_BS, self.top_k, pool_size_BN,
                                      expert_mask_R)
        x_TD = x_BSD.reshape(b * s, d)
        y_TD, rows, dropped = self.routed_experts(
            x_TD, decision.expert_idx_BSK.reshape(b * s, -1),
            decision.weights_BSK.reshape(b * s, -1))
        if self.shared_gate is not None:
            y_TD = y_TD + shared_swiglu(x_TD, self.shared_gate[...], self.shared_up[...],
                                        self.shared_down[...], self.compute_dtype)
        stats = {
            "counts": decision.counts_BR,
            "prob_sums": decision.prob_sums_BR,
            "tokens": decision.tokens_B,
            "z_sums": decision.z_sums_B,
            "pool_sums": decision.pool_sums_B,
            "segments": decision.segments_B,
            "rows_processed": jnp.asarray(rows, jnp.float32),
            "dropped": dropped,
        }
        if assignments:
            stats["expert_idx_BSK"] = jnp.where(decision.weights_BSK > 0,
                                                decision.expert_idx_BSK, -1).astype(jnp.int32)
        return y_TD.reshape(b, s, d), stats

    def routed_experts(self, x_TD, expert_idx_TK, weights_TK):
        """(y_TD, rows_processed, dropped) of the routed experts.

        On a device mesh set with `jax.set_mesh` (at trace time) the experts run sharded
        (`moe_parallel`: expert parallelism over the 'expert' axis); otherwise the local dropless
        path, which never drops.
        """
        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        mesh = moe_parallel.ambient_mesh(x_TD.shape[0])
        if mesh is None:
            y_TD, rows = dispatch_local(x_TD, expert_idx_TK, weights_TK, *weights,
                                        impl=self.impl, block_size=self.block_size,
                                        compute_dtype=self.compute_dtype)
            return y_TD, rows, jnp.zeros((), jnp.float32)
        specs = tuple(moe_parallel.weight_spec(w.get_metadata()["logical_axes"], self.rules)
                      for w in (self.w_gate, self.w_up, self.w_down))
        return moe_parallel.routed_experts(
            x_TD, expert_idx_TK, weights_TK, *weights, mesh=mesh, weight_specs=specs,
            dispatch=self.dispatch, capacity_factor=self.capacity_factor, impl=self.impl,
            block_size=self.block_size, compute_dtype=self.compute_dtype)
