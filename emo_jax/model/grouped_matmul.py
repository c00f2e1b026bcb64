"""Grouped SwiGLU over rows sorted by expert: the local, dropless expert computation.

Four implementations of one contract (`grouped_swiglu`), all dropless:

* 'megablox' (TPU): the Pallas grouped-matmul kernel that ships with JAX
  (`jax.experimental.pallas.ops.tpu.megablox.gmm`, with its own backward pass): each 128-row
  tile runs with its expert's weights read in place. Being a Pallas kernel, XLA cannot
  partition it: the MoE runs it per device (`moe_parallel`, inside `shard_map`).
* 'ragged_dot': `jax.lax.ragged_dot`. Compiled for TPU through XLA (libtpu 0.0.42) it
  materialises [R, A, F] masks: three 7.1 GB buffers per chip at the reference recipe's shape
  on v5p, so 'auto' no longer picks it (docs/RESULTS.md).
* 'blocked' (GPU): each expert's rows are padded up to a multiple of `block_size` and laid out
  as blocks; one batched matmul runs every block with its expert's weights, gathered per block.
  The static block count is ceil(A / block) + min(R, A), the worst case, so nothing is ever
  dropped: work is the routed assignments plus at most one partial block per expert. The
  per-block weight copies cost NB x D x F per weight (4.4 GB in bf16 for the three weights at
  A=28672, D=2048, F=1024, block 128); `chunk_blocks` > 0 runs the blocks in rematerialised
  chunks so only that many copies are live (bench/bench_memory_kernels.py).
* 'looped' (CPU): a loop over only the blocks in use, each one plain 2-D matmul on a window of
  the sorted rows with its expert's weights read in place, and a hand-written backward pass
  (custom VJP) that accumulates the weight gradients expert by expert. No padded copy of the
  rows, no per-block copy of the weights, no spare blocks. On XLA:CPU (2 cores, A=16k,
  D=F=128) the batched matmul of 'blocked' ran at about half the speed of one plain matmul, and
  the per-block weight copies and their scatter-add gradient cost as much again.

Why not ragged_dot everywhere: it is dense over the groups outside TPU. Measured on XLA:CPU
(jax 0.10): with 32 groups it did 32x the FLOPs and took ~70x the time of a plain matmul of the
same active FLOPs. Measured on an H100 (jax 0.11.2, bf16, 32768 x 2048 x 1024): 9.4x the time of
the plain matmul with 8 groups, 37x with 32, 71x with 64, 141x with 128, i.e. linear in the
number of groups (bench/gpu/ragged_probe.py, docs/RESULTS.md).

Glossary: A assignment rows (tokens x top_k, sorted by expert), R experts, D d_model, F expert
hidden, NB blocks, Bk block size.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.model.mesh_context import pallas_allowed, platform


IMPLS = ("auto", "megablox", "ragged_dot", "blocked", "looped")
MEGABLOX_TILE = 128  # rows per tile of the megablox kernel (and its default k, n tiles)


def resolve_impl(impl: str) -> str:
    """'auto' -> 'megablox' on TPU, 'looped' on CPU, 'blocked' on GPU."""
    if impl != "auto":
        return impl
    return {"tpu": "megablox", "cpu": "looped"}.get(platform(), "blocked")


def grouped_swiglu(x_AD, group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD, *, impl: str,
                   block_size: int, compute_dtype=jnp.float32, chunk_blocks: int = 0):
    """y[a] = SwiGLU_{g(a)}(x[a]) for rows sorted by group; rows past sum(group_sizes) give 0.

    chunk_blocks ('blocked' only): run the blocks in chunks of at most this many, one chunk at
    a time, each chunk's body rematerialised in the backward pass, so at most chunk_blocks
    per-block weight copies are live (forward and backward); 0 = all blocks at once (one
    batched matmul, the fastest on small shapes, memory NB x D x F per weight).

    Returns (y_AD, rows_processed): rows_processed is the number of rows the expert matmuls
    actually ran on (a scalar), the evidence that the work is not dense over experts.
    """
    impl = resolve_impl(impl)
    dt = jnp.dtype(compute_dtype)
    x_AD = x_AD.astype(dt)
    w_gate_RDF, w_up_RDF, w_down_RFD = (w.astype(dt) for w in (w_gate_RDF, w_up_RDF, w_down_RFD))
    group_sizes_R = group_sizes_R.astype(jnp.int32)
    if impl == "megablox" and not pallas_allowed():
        impl = "ragged_dot"  # e.g. decoding one row under a mesh: not split per device
    if impl == "megablox":
        y_AD = megablox_swiglu(x_AD, group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD)
        return y_AD, jnp.sum(group_sizes_R)
    if impl == "ragged_dot":
        gate_AF = jax.lax.ragged_dot(x_AD, w_gate_RDF, group_sizes_R)
        up_AF = jax.lax.ragged_dot(x_AD, w_up_RDF, group_sizes_R)
        y_AD = jax.lax.ragged_dot(jax.nn.silu(gate_AF) * up_AF, w_down_RFD, group_sizes_R)
        return y_AD, jnp.sum(group_sizes_R)
    if impl == "blocked":
        return _blocked_swiglu(x_AD, group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD, block_size,
                               chunk_blocks)
    if impl == "looped":
        bk = int(max(1, min(block_size, x_AD.shape[0])))
        schedule = block_schedule(group_sizes_R, x_AD.shape[0], bk)
        y_AD = _looped_swiglu(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk)
        return y_AD, schedule.used * bk
    raise ValueError(f"unknown grouped matmul {impl!r}; valid: {', '.join(IMPLS)}")


def megablox_swiglu(x_AD, group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD, *,
                    interpret: bool = False):
    """SwiGLU of every group with the megablox Pallas kernel (TPU; `interpret` runs it in the
    Pallas interpreter, for tests on CPU). Rows are padded to whole tiles; rows past
    sum(group_sizes) give 0."""
    if not interpret and platform() != "tpu":
        raise ValueError(f"grouped matmul 'megablox' runs only on TPU (the backend is "
                         f"{platform()!r}); use 'auto'")
    from jax.experimental.pallas.ops.tpu import megablox  # Pallas TPU ops: loaded when used

    a, d = x_AD.shape
    f = w_gate_RDF.shape[-1]
    padded = -(-a // MEGABLOX_TILE) * MEGABLOX_TILE
    # The kernel never writes rows past the last group (forward or backward): select, not
    # multiply, so whatever they hold reaches neither the output nor the input's gradient.
    live_P1 = (jnp.arange(padded) < jnp.sum(group_sizes_R))[:, None]
    x_PD = jnp.where(live_P1, jnp.pad(x_AD, ((0, padded - a), (0, 0))), 0)
    tiling_in = (MEGABLOX_TILE, min(MEGABLOX_TILE, d), min(MEGABLOX_TILE, f))
    tiling_out = (MEGABLOX_TILE, min(MEGABLOX_TILE, f), min(MEGABLOX_TILE, d))

    def gmm(lhs, rhs, tiling):
        return megablox.gmm(lhs, rhs, group_sizes_R, x_AD.dtype, tiling, interpret=interpret)

    h_PF = jax.nn.silu(gmm(x_PD, w_gate_RDF, tiling_in)) * gmm(x_PD, w_up_RDF, tiling_in)
    y_PD = gmm(jnp.where(live_P1, h_PF, 0), w_down_RFD, tiling_out)
    return jnp.where(live_P1, y_PD, 0)[:a]


def _blocked_swiglu(x_AD, group_sizes_R, w_gate_RDF, w_up_RDF, w_down_RFD, block_size,
                    chunk_blocks=0):
    a, d = x_AD.shape
    bk = int(max(1, min(block_size, a)))
    nb = num_blocks(group_sizes_R.shape[0], a, bk)
    cb = int(chunk_blocks) if 0 < chunk_blocks < nb else nb
    nb = -(-nb // cb) * cb  # spare blocks fill the last chunk (at most cb - 1 more, zero rows)
    schedule = block_schedule(group_sizes_R, a, bk, nb)
    sorted_unique = dict(indices_are_sorted=True, unique_indices=True)

    # Row a goes to its block's slot: block starts increase strictly, spare blocks included.
    row_A = jnp.arange(a, dtype=jnp.int32)
    block_A = jnp.searchsorted(schedule.start_N, row_A, side="right") - 1
    dest_A = block_A * bk + row_A - schedule.start_N[block_A]
    dest_A = jnp.where(row_A < jnp.sum(group_sizes_R), dest_A, nb * bk)  # unused rows go nowhere
    x_NBD = jnp.zeros((nb * bk, d), x_AD.dtype).at[dest_A].set(x_AD, mode="drop", **sorted_unique)
    x_NBD = x_NBD.reshape(nb, bk, d)

    # Spare blocks past the last used one take the last expert's weights and zero rows.
    group_N = schedule.expert_N

    def blocks(x_NBD, group_N):
        def take(w):
            return jnp.take(w, group_N, axis=0, indices_are_sorted=True, mode="clip")

        h_NBF = jax.nn.silu(jnp.einsum("nbd,ndf->nbf", x_NBD, take(w_gate_RDF))) * \
            jnp.einsum("nbd,ndf->nbf", x_NBD, take(w_up_RDF))
        return jnp.einsum("nbf,nfd->nbd", h_NBF, take(w_down_RFD))

    if cb == nb:
        # One batched matmul over all blocks. Measured on XLA:CPU (2 cores, A=16k, D=F=128):
        # 1.7x faster forward+backward than a lax.scan over the blocks that skipped the spare
        # ones. Memory: a [NB, D, F] copy of each weight (and of its gradient).
        y_NBD = blocks(x_NBD, group_N)
    else:
        # Chunks of cb blocks in a loop; the backward pass recomputes each chunk's weight
        # copies instead of keeping all of them (the weight gradients accumulate across chunks).
        nc = nb // cb
        y_CNBD = jax.lax.map(lambda xs: jax.checkpoint(blocks)(*xs),
                             (x_NBD.reshape(nc, cb, bk, d), group_N.reshape(nc, cb)))
        y_NBD = y_CNBD.reshape(nb, bk, d)
    y_AD = y_NBD.reshape(nb * bk, d).at[dest_A].get(mode="fill", fill_value=0, **sorted_unique)
    return y_AD, jnp.asarray(nb * bk, jnp.int32)


class BlockSchedule(NamedTuple):
    """Blocks of at most `bk` sorted rows, each inside one expert's group; only the first `used`
    of the static worst-case count are real. Block n covers rows [start_N[n], end_N[n])."""

    expert_N: jax.Array
    start_N: jax.Array
    end_N: jax.Array
    used: jax.Array


def num_blocks(r: int, a: int, bk: int) -> int:
    """The static worst-case block count of `a` sorted rows in `r` groups: every non-empty group
    wastes at most one partial block, so ceil(a / bk) + min(r, a)."""
    return -(-a // bk) + min(r, a)


def block_schedule(group_sizes_R, a: int, bk: int, nb: int | None = None) -> BlockSchedule:
    """The blocks of `a` sorted rows in groups of `group_sizes_R`, `nb` of them (default and
    minimum: the worst case, `num_blocks`); blocks past the used ones are spare: they take the
    last expert and start past the rows, at strictly increasing starts."""
    r = group_sizes_R.shape[0]
    nb = max(num_blocks(r, a, bk), nb or 0)
    group_end_R = jnp.cumsum(group_sizes_R)
    group_start_R = group_end_R - group_sizes_R
    blocks_R = (group_sizes_R + bk - 1) // bk
    block_end_R = jnp.cumsum(blocks_R)
    block_N = jnp.arange(nb, dtype=jnp.int32)
    expert_N = jnp.minimum(jnp.searchsorted(block_end_R, block_N, side="right"), r - 1)
    first_block_N = (block_end_R - blocks_R)[expert_N]
    start_N = group_start_R[expert_N] + (block_N - first_block_N) * bk
    return BlockSchedule(expert_N.astype(jnp.int32), start_N.astype(jnp.int32),
                         group_end_R[expert_N].astype(jnp.int32), block_end_R[-1].astype(jnp.int32))


def _window(x_AX, start, bk):
    return jax.lax.dynamic_slice_in_dim(x_AX, start, bk, axis=0)


def _write_live(buf_AX, rows_BX, start, live_B):
    """Writes the live rows of a window back; the others keep what another block wrote."""
    old_BX = _window(buf_AX, start, live_B.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(
        buf_AX, jnp.where(live_B[:, None], rows_BX, old_BX), start, axis=0)


def _add_at(acc_RXY, e, update_XY):
    return jax.lax.dynamic_update_index_in_dim(
        acc_RXY, jax.lax.dynamic_index_in_dim(acc_RXY, e, keepdims=False) + update_XY, e, axis=0)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over inside shard_map (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", None) or ())


def _zeros(shape, dtype):
    """Zeros for a loop carry. Inside shard_map a carry must keep its manual-axes type through the
    loop, so the zeros are made varying over every manual axis of the ambient mesh: the body's
    outputs, which mix in the carry, then vary over exactly those axes too."""
    z = jnp.zeros(shape, dtype)
    mesh = jax.sharding.get_abstract_mesh()
    manual = () if mesh.empty else tuple(
        a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual)
    return jax.lax.pcast(z, manual, to="varying") if manual else z


def _summed_to(grad, primal):
    """The gradient of a primal that is the same on some manual axes is the sum over them of the
    per-device gradients (what autodiff does for an implicitly broadcast input)."""
    extra = _varying_axes(grad) - _varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _padded(x_AX, bk):
    """bk zero rows appended, so a window that starts near the end still has bk rows."""
    return jnp.concatenate([x_AX, jnp.zeros((bk,) + x_AX.shape[1:], x_AX.dtype)])


def _block(schedule, n, bk):
    start = schedule.start_N[n]
    live_B = start + jnp.arange(bk) < schedule.end_N[n]
    return schedule.expert_N[n], start, live_B


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _looped_swiglu(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk):
    return _looped_forward(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk)[0]


def _looped_forward(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk):
    """(y_AD, gate_AF, up_AF): the output and the pre-activations the backward pass reuses."""
    a, d = x_AD.shape
    f = w_gate_RDF.shape[-1]
    x_pad = _padded(x_AD, bk)

    def body(n, carry):
        y, gate, up = carry
        e, start, live_B = _block(schedule, n, bk)
        x_BD = _window(x_pad, start, bk)
        gate_BF = x_BD @ w_gate_RDF[e]
        up_BF = x_BD @ w_up_RDF[e]
        y_BD = (jax.nn.silu(gate_BF) * up_BF) @ w_down_RFD[e]
        return (_write_live(y, y_BD, start, live_B), _write_live(gate, gate_BF, start, live_B),
                _write_live(up, up_BF, start, live_B))

    zeros = (_zeros((a + bk, d), x_AD.dtype), _zeros((a + bk, f), x_AD.dtype),
             _zeros((a + bk, f), x_AD.dtype))
    y, gate, up = jax.lax.fori_loop(0, schedule.used, body, zeros)
    return y[:a], gate, up


def _looped_fwd(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk):
    y_AD, gate_AF, up_AF = _looped_forward(x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, bk)
    return y_AD, (x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, gate_AF, up_AF)


def _looped_bwd(bk, residuals, dy_AD):
    x_AD, schedule, w_gate_RDF, w_up_RDF, w_down_RFD, gate_AF, up_AF = residuals
    a, d = x_AD.shape
    x_pad, dy_pad = _padded(x_AD, bk), _padded(dy_AD.astype(x_AD.dtype), bk)
    acc = jnp.float32

    def body(n, carry):
        dx, dw_gate, dw_up, dw_down = carry
        e, start, live_B = _block(schedule, n, bk)
        x_BD = _window(x_pad, start, bk)
        # Rows of the window outside this block get a zero cotangent, so they add nothing to
        # this expert's weight gradients.
        dy_BD = jnp.where(live_B[:, None], _window(dy_pad, start, bk), 0)
        gate_BF, up_BF = _window(gate_AF, start, bk), _window(up_AF, start, bk)
        sig_BF = jax.nn.sigmoid(gate_BF)
        act_BF = gate_BF * sig_BF
        dh_BF = dy_BD @ w_down_RFD[e].T
        dup_BF = dh_BF * act_BF
        dgate_BF = dh_BF * up_BF * sig_BF * (1 + gate_BF * (1 - sig_BF))
        dx_BD = dgate_BF @ w_gate_RDF[e].T + dup_BF @ w_up_RDF[e].T
        return (_write_live(dx, dx_BD, start, live_B),
                _add_at(dw_gate, e, jnp.dot(x_BD.T, dgate_BF, preferred_element_type=acc)),
                _add_at(dw_up, e, jnp.dot(x_BD.T, dup_BF, preferred_element_type=acc)),
                _add_at(dw_down, e, jnp.dot((act_BF * up_BF).T, dy_BD, preferred_element_type=acc)))

    zeros = (_zeros((a + bk, d), x_AD.dtype), _zeros(w_gate_RDF.shape, acc),
             _zeros(w_up_RDF.shape, acc), _zeros(w_down_RFD.shape, acc))
    dx, dw_gate, dw_up, dw_down = jax.lax.fori_loop(0, schedule.used, body, zeros)
    no_grad = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0), schedule)
    dws = [_summed_to(dw, w).astype(w.dtype) for dw, w in
           ((dw_gate, w_gate_RDF), (dw_up, w_up_RDF), (dw_down, w_down_RFD))]
    return (_summed_to(dx[:a], x_AD), no_grad, *dws)


_looped_swiglu.defvjp(_looped_fwd, _looped_bwd)
