"""The MoE block: router, EMO document pools, dropless dispatch to SwiGLU experts, combine.

The block owns the parameters; routing decisions come from the pure functions in `routing.py`
and the expert computation from `experts.py`. When the block is traced under `jax.set_mesh`,
routing and the routed experts run per device with expert parallelism (`moe_parallel.py`; its
capacity dispatch may drop: `RoutingStats.dropped`); otherwise on the one-device dropless path.

Glossary: B rows, S positions, T = B*S tokens, K top-k, R routed experts, X shared experts,
D d_model, F expert hidden.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import experts, moe_parallel
from emo_jax.model.layers import param
from emo_jax.model.mesh_context import ambient_mesh
from emo_jax.model.model_config import ModelConfig

# Intermediates a caller can ask the forward for (`capture=`), per MoE layer:
#   'expert_idx'     expert_idx_BSK  int32 routed expert of every assignment, -1 where none was
#                                    made (padding, or a gate weight of 0)
#   'router_probs'   router_probs_BSR  float32 router softmax over the allowed experts (pool and
#                                    subset mask applied), 0 at padding
#   'expert_contrib' gate_weights_BSK, expert_idx_BSK, expert_out_norm_BSK (L2 norm of each
#                    assignment's expert output before weighting) and moe_turn_BS =
#                    1 - cos(h, h + moe(h)): how far the MoE sub-layer turns the residual stream
#                    (one-device path only)
CAPTURES = ("expert_idx", "router_probs", "expert_contrib")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoutingStats:
    """One MoE layer's routing statistics per row (stacked to [L, ...] by the Transformer).

    These are what the balance loss, the router z-loss and the routing metrics are formed from
    (`emo_jax/model/losses.py`, `emo_jax/train/loss.py`).
    """

    counts_BR: jax.Array  # float32 routed assignments per expert (real tokens only)
    prob_sums_BR: jax.Array  # float32 sum over real tokens of the (pool-masked) router softmax
    tokens_B: jax.Array  # float32 real tokens
    z_sums_B: jax.Array  # float32 sum over real tokens of logsumexp(masked router logits)^2
    pool_sums_B: jax.Array  # float32 sum of the row's segments' pool sizes (0 without pools)
    segments_B: jax.Array  # float32 segments in the row (0 without pools)
    rows_processed: jax.Array  # float32 rows the grouped matmul ran (padding blocks included)
    dropped: jax.Array  # float32 assignments dropped by a capacity dispatch (0 when dropless)


class MoE(nnx.Module):
    """SwiGLU experts with EMO document-pool routing (or standard top-k routing)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, std = config.d_model, config.expert_hidden, config.init_std
        r, x = config.routed_experts, config.num_shared_experts
        self.config = config
        self.router = param(rngs, (d, r), ("embed", "router"), std, config.init)
        self.w_gate = param(rngs, (r, d, f), ("expert", "embed", "expert_mlp"), std, config.init)
        self.w_up = param(rngs, (r, d, f), ("expert", "embed", "expert_mlp"), std, config.init)
        self.w_down = param(rngs, (r, f, d), ("expert", "expert_mlp", "embed"), std, config.init)
        if x:
            self.shared_gate = param(rngs, (x, d, f), ("shared", "embed", "mlp"), std, config.init)
            self.shared_up = param(rngs, (x, d, f), ("shared", "embed", "mlp"), std, config.init)
            self.shared_down = param(rngs, (x, f, d), ("shared", "mlp", "embed"), std, config.init)
        else:
            self.shared_gate = self.shared_up = self.shared_down = None
        # The shared experts' own router (the reference's gate rows R..E-1, transposed): their
        # weights are the softmax over these X logits. One shared expert has none: the softmax
        # over one logit is 1.0, so it is left out (the model and its checkpoints as before).
        self.shared_router = (param(rngs, (d, x), ("embed", "shared"), std, config.init)
                              if x > 1 else None)

    def __call__(self, x_BSD, segment_ids_BS, pool_size_BN=None, expert_mask_R=None, *,
                 capture: tuple[str, ...] = ()):
        """Returns (y_BSD float32, RoutingStats, captured: dict of the `capture` intermediates).

        pool_size_BN: int32 pool size per row and segment slot, or None (plain top-k).
        expert_mask_R: optional bool, the routed experts that exist (a subset by masking).
        """
        b, s, d = x_BSD.shape
        logits_BSR = jnp.einsum("bsd,dr->bsr", x_BSD.astype(jnp.float32), self.router[...])
        decision = moe_parallel.route(logits_BSR, segment_ids_BS, self.config.top_k,
                                      pool_size_BN, expert_mask_R)
        x_TD = x_BSD.reshape(b * s, d)
        expert_idx_TK = decision.expert_idx_BSK.reshape(b * s, -1)
        weights_TK = decision.weights_BSK.reshape(b * s, -1)
        captured = {}
        if "expert_contrib" in capture:
            y_TD, rows, norm_TK = self._local_experts(x_TD, expert_idx_TK, weights_TK,
                                                      output_norms=True)
            dropped = jnp.zeros((), jnp.float32)
            captured["expert_out_norm_BSK"] = norm_TK.reshape(b, s, -1)
            captured["gate_weights_BSK"] = decision.weights_BSK
        else:
            y_TD, rows, dropped = self._routed_experts(x_TD, expert_idx_TK, weights_TK)
        if self.shared_gate is not None:
            weights_TX = None
            if self.shared_router is not None:
                weights_TX = jax.nn.softmax(jnp.einsum(
                    "td,dx->tx", x_TD.astype(jnp.float32), self.shared_router[...]), axis=-1)
            y_TD = y_TD + experts.shared_swiglu(x_TD, self.shared_gate[...], self.shared_up[...],
                                                self.shared_down[...], self.config.compute_dtype,
                                                weights_TX)
        if "expert_idx" in capture or "expert_contrib" in capture:
            captured["expert_idx_BSK"] = jnp.where(decision.weights_BSK > 0,
                                                   decision.expert_idx_BSK, -1).astype(jnp.int32)
        if "router_probs" in capture:
            captured["router_probs_BSR"] = decision.probs_BSR
        stats = RoutingStats(
            counts_BR=decision.counts_BR,
            prob_sums_BR=decision.prob_sums_BR,
            tokens_B=decision.tokens_B,
            z_sums_B=decision.z_sums_B,
            pool_sums_B=decision.pool_sums_B,
            segments_B=decision.segments_B,
            rows_processed=jnp.asarray(rows, jnp.float32),
            dropped=dropped,
        )
        return y_TD.reshape(b, s, d), stats, captured

    def _local_experts(self, x_TD, expert_idx_TK, weights_TK, output_norms: bool = False):
        c = self.config
        return experts.dispatch_local(
            x_TD, expert_idx_TK, weights_TK, self.w_gate[...], self.w_up[...], self.w_down[...],
            impl=c.grouped_matmul, block_size=c.block_size, compute_dtype=c.compute_dtype,
            chunk_blocks=c.blocked_chunk_blocks, output_norms=output_norms)

    def _routed_experts(self, x_TD, expert_idx_TK, weights_TK):
        """(y_TD, rows_processed, dropped) of the routed experts.

        On a device mesh set with `jax.set_mesh` (at trace time) the experts run sharded
        (`moe_parallel`: expert parallelism over the 'expert' axis); otherwise the local dropless
        path, which never drops.
        """
        mesh = ambient_mesh(x_TD.shape[0])
        if mesh is None:
            y_TD, rows = self._local_experts(x_TD, expert_idx_TK, weights_TK)
            return y_TD, rows, jnp.zeros((), jnp.float32)
        c = self.config
        weights = (self.w_gate, self.w_up, self.w_down)
        specs = tuple(moe_parallel.weight_spec(w.get_metadata()["logical_axes"],
                                               c.sharding_rules) for w in weights)
        return moe_parallel.routed_experts(
            x_TD, expert_idx_TK, weights_TK, *(w[...] for w in weights), mesh=mesh,
            weight_specs=specs, dispatch=c.dispatch, capacity_factor=c.capacity_factor,
            impl=c.grouped_matmul, block_size=c.block_size, compute_dtype=c.compute_dtype,
            chunk_blocks=c.blocked_chunk_blocks)
