"""The MoE layer on a device mesh: routing and routed experts run per device under
`jax.shard_map`, with expert parallelism over the 'expert' axis.

`MoE` calls `route` and `routed_experts` here when `jax.set_mesh` set a mesh at trace time.
Routing is row-local, so each device routes its own rows (the pure functions of `routing.py`).
Then each device sends every assignment to the device that owns its expert, runs its local
experts with the grouped matmul of the one-device path, and sends the results back. Two
dispatches (`moe.dispatch`; 'auto' takes 'ragged' where the backend has it):

* 'capacity': `jax.lax.all_to_all` on fixed [E, C, D] buffers, on every backend (XLA:CPU
  included). An expert takes at most C assignments from each device, in slot order (token-major,
  then k); the rest are dropped (contribute 0) and counted exactly in `dropped`.
* 'ragged': dropless `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU does not implement it). The
  offsets come from one all_gather of every device's per-expert counts; the receive buffer has
  the static worst-case size.

With an 'expert' axis of size 1 the same shard_map runs the dropless one-device path on each
device's rows, with no communication but the weight gathers. Left to GSPMD, the sort by expert
over a batch sharded on T would be a sort over the whole global batch, on every device.

Expert weights arrive sharded over 'expert' on their leading axis and, as `mesh.rules` says,
over other mesh axes (e.g. 'fsdp' on 'embed'); those are all-gathered inside each expert shard,
so no device ever holds more than its E/EP experts.

This module makes no routing decision of its own, forms no loss, and never computes an expert
densely for every token.

Glossary: T tokens on this device, K top-k, A = T*K assignments, E routed experts, EP size of the
'expert' axis, El = E/EP experts per device, C capacity slots per (source device, expert),
D d_model, F expert hidden, S devices of the 'expert' axis (= EP), J local experts of a device
(El of them), N rows of a receive buffer. `route` keeps routing.py's letters (B rows,
S positions, R routed experts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from emo_jax.model import experts, routing
from emo_jax.model.grouped_matmul import grouped_swiglu, resolve_impl
from emo_jax.model.mesh_context import (BATCH_AXES, EXPERT_AXIS, ambient_mesh,
                                        logical_spec, platform)

DISPATCHES = ("auto", "capacity", "ragged")
_RAGGED_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def route(logits_BSR, segment_ids_BS, top_k: int, pool_size_BN=None, expert_mask_R=None):
    """`routing.route` on each device's own rows when a mesh is set (routing is row-local).

    Left to GSPMD, top_k over a batch-sharded [B, S, R] all-gathers the whole global batch onto
    every device (seen in the compiled HLO on a (2, 2, 2) mesh): at 4M tokens x 127 experts that
    is 2 GB per layer per device.
    """
    mesh = ambient_mesh(logits_BSR.shape[0])
    if mesh is None:
        return routing.route(logits_BSR, segment_ids_BS, top_k, pool_size_BN, expert_mask_R)
    rows = P(BATCH_AXES)
    args, specs = [logits_BSR, segment_ids_BS], [rows, rows]
    if pool_size_BN is not None:
        args, specs = args + [pool_size_BN], specs + [rows]
    if expert_mask_R is not None:
        args, specs = args + [expert_mask_R], specs + [P()]

    def per_device(logits_BSR, segment_ids_BS, *rest):
        rest = list(rest)
        pool = rest.pop(0) if pool_size_BN is not None else None
        mask = rest.pop(0) if expert_mask_R is not None else None
        return routing.route(logits_BSR, segment_ids_BS, top_k, pool, mask)

    out_specs = routing.Routing(*([rows] * len(routing.Routing._fields)))
    return jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs)(*args)


def resolve_dispatch(dispatch: str) -> str:
    """'auto' -> 'ragged' where the backend implements ragged_all_to_all, else 'capacity'."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe.dispatch is {dispatch!r}; valid: {', '.join(DISPATCHES)}")
    native = platform() in _RAGGED_BACKENDS
    if dispatch == "auto":
        return "ragged" if native else "capacity"
    if dispatch == "ragged" and not native and _ragged_all_to_all is jax.lax.ragged_all_to_all:
        raise ValueError(f"moe.dispatch='ragged' needs ragged_all_to_all, which the "
                         f"{platform()!r} backend does not implement; use 'capacity' "
                         f"or 'auto'")
    return dispatch


def capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """C: slots per (source device, expert) = factor x the fair share T*K/E, rounded up.

    At most T: a token sends an expert at most one assignment, so T slots never overflow.
    """
    return int(min(tokens, max(1, math.ceil(factor * tokens * top_k / num_experts))))


def weight_spec(logical_axes, rules) -> P:
    """in_spec of a stacked-expert weight: 'expert' on the leading axis, the rest from `rules`
    (config.mesh.rules) as `logical_spec` resolves them."""
    return P(EXPERT_AXIS, *logical_spec(tuple(logical_axes)[1:], dict(rules),
                                        taken=(EXPERT_AXIS,)))


def _gather_within_expert_shard(w, spec: P, mesh):
    """All-gathers every non-leading axis that `spec` shards: the local experts, whole."""
    for dim, axes in enumerate(tuple(spec)[1:], start=1):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if math.prod(mesh.shape[a] for a in axes) > 1:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def routed_experts(x_TD, expert_idx_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, mesh,
                   weight_specs, dispatch: str, capacity_factor: float, impl: str,
                   block_size: int, compute_dtype, chunk_blocks: int = 0):
    """y_t = sum_k w_tk Expert_{i_tk}(x_t) for a batch sharded over the batch axes of `mesh`.

    Args:
      x_TD, expert_idx_TK, weights_TK: global arrays, T sharded over ('data', 'fsdp', 'expert').
      w_*: stacked routed-expert weights (global), laid out as `weight_specs` says.
      mesh: the (abstract) mesh; its 'expert' axis holds E/EP experts per device.
      weight_specs: (gate, up, down) PartitionSpecs from `weight_spec`.
      dispatch: 'auto' | 'capacity' | 'ragged' (used only when the 'expert' axis is > 1).

    Returns (y_TD float32, rows_processed, dropped): the expert rows computed and the routed
    assignments dropped for lack of capacity, both summed over the whole mesh.
    """
    ep = mesh.shape[EXPERT_AXIS]
    if w_gate_EDF.shape[0] % ep:
        raise ValueError(f"{w_gate_EDF.shape[0]} routed experts do not split over the 'expert' "
                         f"mesh axis of size {ep}")
    mode = "local" if ep == 1 else resolve_dispatch(dispatch)
    kwargs = dict(impl=impl, block_size=block_size, compute_dtype=compute_dtype,
                  chunk_blocks=chunk_blocks)
    all_axes = tuple(mesh.axis_names)
    rows_spec = P(BATCH_AXES)

    def per_device(x_TD, idx_TK, w_TK, wg, wu, wd):
        wg, wu, wd = (_gather_within_expert_shard(w, s, mesh)
                      for w, s in zip((wg, wu, wd), weight_specs))
        if mode == "local":
            y_TD, rows = experts.dispatch_local(x_TD, idx_TK, w_TK, wg, wu, wd, **kwargs)
            dropped = jnp.zeros((), jnp.int32)
        elif mode == "capacity":
            y_TD, rows, dropped = capacity_dispatch(x_TD, idx_TK, w_TK, wg, wu, wd, ep=ep,
                                                    capacity_factor=capacity_factor, **kwargs)
        else:
            y_TD, rows = ragged_dispatch(x_TD, idx_TK, w_TK, wg, wu, wd, ep=ep, **kwargs)
            dropped = jnp.zeros((), jnp.int32)
        return (y_TD, jax.lax.psum(jnp.asarray(rows, jnp.int32), all_axes),
                jax.lax.psum(jnp.asarray(dropped, jnp.int32), all_axes))

    # A Pallas kernel's outputs carry no varying-axes type, which shard_map's check needs; without
    # the check, shard_map psums the gradients of the weights over the axes they do not vary on.
    check_vma = resolve_impl(impl) != "megablox"
    y_TD, rows, dropped = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(rows_spec, rows_spec, rows_spec, *weight_specs),
        out_specs=(rows_spec, P(), P()), check_vma=check_vma,
    )(x_TD, expert_idx_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
    return y_TD, rows.astype(jnp.float32), dropped.astype(jnp.float32)


def capacity_slots(expert_idx_TK, weights_TK, num_experts: int, cap: int):
    """Where each assignment goes in the [E, C] capacity buffers of its device.

    Assignments of weight 0 are none. An expert's live assignments take slots 0, 1, ... in flat
    (token, k) order; those at slot >= C are dropped. Returns (dest_A = expert * C + slot, or
    E * C for dead and dropped ones; kept_E = assignments each expert keeps; dropped count).
    """
    t, k = expert_idx_TK.shape
    expert_A = expert_idx_TK.reshape(-1)
    live_A = weights_TK.reshape(-1) > 0
    # A stable sort by expert keeps the slot order; a row's slot is its rank within its group.
    order_A, group_sizes_E = experts.sort_assignments(expert_idx_TK, weights_TK, num_experts)
    start_E = _exclusive_cumsum(group_sizes_E)
    slot_sorted_A = jnp.arange(t * k, dtype=jnp.int32) - start_E[
        jnp.minimum(expert_A[order_A], num_experts - 1)]
    slot_A = jnp.zeros((t * k,), jnp.int32).at[order_A].set(slot_sorted_A)
    keep_A = live_A & (slot_A < cap)
    dest_A = jnp.where(keep_A, expert_A * cap + slot_A, num_experts * cap)
    dropped = jnp.sum(live_A & ~keep_A, dtype=jnp.int32)
    return dest_A, jnp.minimum(group_sizes_E, cap), dropped


def capacity_dispatch(x_TD, expert_idx_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                      ep: int, capacity_factor: float, impl: str, block_size: int,
                      compute_dtype, chunk_blocks: int = 0):
    """One device's share of the capacity-bounded expert-parallel MoE (inside shard_map).

    w_* are this device's El local experts. Returns (y_TD float32, rows_processed, dropped).
    """
    t, k = expert_idx_TK.shape
    d = x_TD.shape[-1]
    el = w_gate_EDF.shape[0]
    e = el * ep
    cap = capacity(t, k, e, capacity_factor)
    dt = jnp.dtype(compute_dtype)

    dest_A, kept_E, dropped = capacity_slots(expert_idx_TK, weights_TK, e, cap)
    x_AD = jnp.repeat(x_TD.astype(dt), k, axis=0)
    send_ECD = jnp.zeros((e * cap, d), dt).at[dest_A].set(x_AD, mode="drop")
    # Device s owns experts [s*El, (s+1)*El): block s of the buffer goes to device s, and what
    # arrives is [source device, local expert, slot].
    recv_SJCD = jax.lax.all_to_all(send_ECD.reshape(ep, el, cap, d), EXPERT_AXIS, 0, 0)
    recv_kept_SJ = jax.lax.all_to_all(kept_E.reshape(ep, el), EXPERT_AXIS, 0, 0)

    # A slot is live below its source's count. Reusing the dropless local path (sort + grouped
    # matmul) runs the experts on the live rows only, not on the empty slots that a dense
    # [El, S*C, D] einsum would compute too.
    live_SJC = jnp.arange(cap)[None, None, :] < recv_kept_SJ[:, :, None]
    local_expert_SJC = jnp.broadcast_to(jnp.arange(el)[None, :, None], (ep, el, cap))
    y_ND, rows = experts.dispatch_local(
        recv_SJCD.reshape(-1, d), local_expert_SJC.reshape(-1, 1),
        live_SJC.reshape(-1, 1).astype(jnp.float32), w_gate_EDF, w_up_EDF, w_down_EFD,
        impl=impl, block_size=block_size, compute_dtype=compute_dtype, chunk_blocks=chunk_blocks)

    back_SJCD = jax.lax.all_to_all(y_ND.astype(dt).reshape(ep, el, cap, d), EXPERT_AXIS, 0, 0)
    y_AD = back_SJCD.reshape(e * cap, d).at[dest_A].get(mode="fill", fill_value=0)
    y_TD = jnp.einsum("tkd,tk->td", y_AD.reshape(t, k, d).astype(jnp.float32),
                      weights_TK.astype(jnp.float32))
    return y_TD, rows, dropped


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`'s contract built from all_gather: slow, but on every backend.

    The CPU tests run the ragged dispatch with it to check the offset arithmetic, which the
    real collective (GPU/TPU only) then uses unchanged.
    """
    del recv_sizes  # implied by the senders' send_sizes
    n = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    per = input_offsets.shape[0] // n
    operand_S = jax.lax.all_gather(operand, axis_name)
    mine = lambda a: jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(a, axis_name), me * per,
                                                  per, axis=1)
    start_SJ, size_SJ, dest_SJ = mine(input_offsets), mine(send_sizes), mine(output_offsets)
    row_M = jnp.arange(output.shape[0])
    hit_SJM = (row_M >= dest_SJ[..., None]) & (row_M < (dest_SJ + size_SJ)[..., None])
    src_row_SJM = jnp.clip(start_SJ[..., None] + row_M - dest_SJ[..., None], 0,
                           operand.shape[0] - 1)
    src_SJM = jnp.broadcast_to(jnp.arange(n)[:, None, None], src_row_SJM.shape)
    values = operand_S[src_SJM, src_row_SJM]  # [S, J, M, ...]
    hit = hit_SJM.reshape(hit_SJM.shape + (1,) * (operand.ndim - 1))
    received = jnp.sum(jnp.where(hit, values, 0), axis=(0, 1)).astype(output.dtype)
    return jnp.where(jnp.any(hit, axis=(0, 1)), received, output)


# The collective the ragged dispatch uses; tests swap in ragged_all_to_all_reference on CPU.
_ragged_all_to_all = jax.lax.ragged_all_to_all


def ragged_dispatch(x_TD, expert_idx_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                    ep: int, impl: str, block_size: int, compute_dtype, chunk_blocks: int = 0):
    """One device's share of the dropless expert-parallel MoE (inside shard_map).

    Each device sorts its assignments by expert and sends expert i's rows as one slice to the
    owner of i. The receiver lays its buffer out local-expert-major, source-minor, so the rows
    arrive already grouped for the grouped matmul. Offsets come from counts_SE (every device's
    rows per expert, one all_gather):
      send:    input_offsets[i] = rows before expert i in my sorted buffer; send_sizes[i] = mine[i]
      land:    output_offsets[i] = (rows of experts before i on i's owner)
                                   + (rows for i from devices before me)
      receive: recv_sizes[s*El + j] = counts_SE[s, me*El + j]
    and the return trip is the same slices with the roles swapped. The receive buffer holds the
    worst case, S * T * min(K, El) rows (a token sends at most min(K, El) assignments to one
    device), as in MaxText. Returns (y_TD float32, rows_processed).
    """
    t, k = expert_idx_TK.shape
    d = x_TD.shape[-1]
    el = w_gate_EDF.shape[0]
    e = el * ep
    dt = jnp.dtype(compute_dtype)
    me = jax.lax.axis_index(EXPERT_AXIS)

    order_A, mine_E = experts.sort_assignments(expert_idx_TK, weights_TK, e)
    x_AD = x_TD.astype(dt)[order_A // k]  # live rows first, by expert; dead rows last (not sent)
    counts_SE = jax.lax.all_gather(mine_E, EXPERT_AXIS)

    total_E = counts_SE.sum(0)
    expert_base_E = _exclusive_cumsum(total_E.reshape(ep, el), axis=1).reshape(e)
    before_me_E = jnp.sum(jnp.where(jnp.arange(ep)[:, None] < me, counts_SE, 0), axis=0)
    my_counts_SJ = jax.lax.dynamic_slice_in_dim(counts_SE, me * el, el, axis=1)

    input_offsets = _exclusive_cumsum(mine_E)
    output_offsets = expert_base_E + before_me_E
    recv_sizes = my_counts_SJ.reshape(-1)
    buffer_rows = ep * t * min(k, el)
    recv_ND = _ragged_all_to_all(x_AD, jnp.zeros((buffer_rows, d), dt), input_offsets, mine_E,
                                 output_offsets, recv_sizes, axis_name=EXPERT_AXIS)

    y_ND, rows = grouped_swiglu(recv_ND, my_counts_SJ.sum(0), w_gate_EDF, w_up_EDF, w_down_EFD,
                                impl=impl, block_size=block_size, compute_dtype=dt,
                                chunk_blocks=chunk_blocks)

    my_base_J = jax.lax.dynamic_slice_in_dim(expert_base_E, me * el, el)
    back_input_offsets = (my_base_J[None, :] + _exclusive_cumsum(my_counts_SJ, axis=0)).reshape(-1)
    back_output_offsets = jax.lax.dynamic_slice_in_dim(
        _exclusive_cumsum(counts_SE, axis=1), me * el, el, axis=1).reshape(-1)
    y_sorted_AD = _ragged_all_to_all(y_ND.astype(dt), jnp.zeros((t * k, d), dt),
                                     back_input_offsets, recv_sizes, back_output_offsets, mine_E,
                                     axis_name=EXPERT_AXIS)
    y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
    y_TD = jnp.einsum("tkd,tk->td", y_AD.reshape(t, k, d).astype(jnp.float32),
                      weights_TK.astype(jnp.float32))
    return y_TD, rows
