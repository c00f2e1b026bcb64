"""Expert computation on one device: dropless routed experts (sort the assignments by expert, one
grouped SwiGLU matmul, unsort, weighted combine) and the always-on shared experts.

`dispatch_local` is the one-device path of the MoE block and the per-shard building block of the
expert-parallel path (`moe_parallel.py`); neither decides any routing.

Glossary: T tokens, K top-k, A = T*K assignments, R routed experts, X shared experts,
D d_model, F expert hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.model.grouped_matmul import grouped_swiglu


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
                   impl: str, block_size: int, compute_dtype, chunk_blocks: int = 0,
                   output_norms: bool = False):
    """Dropless routed-expert output y_t = sum_k w_tk Expert_{i_tk}(x_t) on one device.

    Returns (y_TD, rows_processed), and with `output_norms` also norm_TK: the float32 L2 norm
    of every assignment's expert output before it is weighted (0 where no assignment was made).
    """
    t, k = expert_idx_TK.shape
    order_A, group_sizes_R = sort_assignments(expert_idx_TK, weights_TK, w_gate_RDF.shape[0])
    token_A = order_A // k
    y_sorted_AD, rows = grouped_swiglu(
        x_TD[token_A], group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD,
        impl=impl, block_size=block_size, compute_dtype=compute_dtype, chunk_blocks=chunk_blocks)
    y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
    y_TKD = y_AD.reshape(t, k, -1).astype(jnp.float32)
    y_TD = jnp.einsum("tkd,tk->td", y_TKD, weights_TK.astype(jnp.float32))
    if output_norms:
        norm_TK = jnp.linalg.norm(y_TKD, axis=-1) * (weights_TK > 0)
        return y_TD, rows, norm_TK
    return y_TD, rows


def shared_swiglu(x_TD, w_gate_XDF, w_up_XDF, w_down_XFD, compute_dtype, weights_TX=None):
    """The always-on experts: y_t = sum_x w_tx Expert_x(x_t).

    weights_TX None: each weight is 1.0 (one shared expert: the softmax over its one logit);
    the sum is taken inside the down projection, as it always was. Otherwise the float32 weights
    (the softmax over the shared experts' own router logits) scale each expert's float32 output,
    as the routed experts' are in `dispatch_local`.
    """
    dt = jnp.dtype(compute_dtype)
    x_TD = x_TD.astype(dt)
    gate_TXF = jnp.einsum("td,xdf->txf", x_TD, w_gate_XDF.astype(dt))
    up_TXF = jnp.einsum("td,xdf->txf", x_TD, w_up_XDF.astype(dt))
    if weights_TX is None:
        return jnp.einsum("txf,xfd->td", jax.nn.silu(gate_TXF) * up_TXF,
                          w_down_XFD.astype(dt)).astype(jnp.float32)
    y_TXD = jnp.einsum("txf,xfd->txd", jax.nn.silu(gate_TXF) * up_TXF,
                       w_down_XFD.astype(dt)).astype(jnp.float32)
    return jnp.einsum("txd,tx->td", y_TXD, weights_TX.astype(jnp.float32))
