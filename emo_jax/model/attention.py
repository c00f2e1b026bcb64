"""Segment-confined causal attention: one contract, several implementations.

`attention(q, k, v, segment_ids, impl=...)` computes, for every query position s of row b,
softmax attention over the keys t <= s of the same segment (segment id 0 is padding: a padding
query outputs zeros and a padding key is never seen). Heads may be grouped (K key/value heads
shared by H = K*G query heads). Softmax runs in float32.

Implementations (`resolve_attention_impl` picks one for 'auto'):

* 'dense': the [B, H, S, S] float32 scores materialised (`dense_attention`, the reference). Fine
  at small S; at S=4096 its scores and their gradient dominate a training step's memory.
* 'chunked': pure-XLA flash attention (`chunked_attention`): a loop over query chunks, inside it
  an online softmax over key chunks, key chunks wholly above the causal diagonal skipped. A
  custom VJP recomputes the scores chunk by chunk in the backward pass (FlashAttention-2), so
  forward and backward keep O(S * chunk) temporaries, and only q, k, v, the output and the
  per-query log-sum-exp are saved.
* 'cudnn': cuDNN flash attention on NVIDIA GPUs. The public `jax.nn.dot_product_attention`
  takes segments only as a dense mask (turned into an [B, 1, S, S] bias: O(S^2) again), so this
  uses jax's cuDNN wrapper with the packed ("ragged offsets") layout: each segment becomes a
  contiguous run given by its offset and length. Requires bf16/fp16 and segments that are
  contiguous runs (what the packer produces). Not yet run on a GPU from this repo: opt-in.
* 'splash': Pallas splash attention on TPU, with `SegmentIds` and a causal mask.

Glossary: B rows, S positions (queries), T positions (keys), H query heads, K key/value heads,
G = H / K, Dh head dim, C chunk length, N number of chunks.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from emo_jax.model.mesh_context import BATCH_AXES, ambient_mesh, pallas_allowed, platform

# A finite "minus infinity": exp() of it is exactly 0, and it never produces NaN in softmax.
NEG_INF = -1e30

IMPLS = ("auto", "dense", "chunked", "cudnn", "splash")

# 'auto' on CPU keeps the dense reference up to this sequence length (today's numbers for the
# small configs); longer rows go chunked.
CPU_DENSE_MAX_SEQ = 1024


def resolve_attention_impl(impl: str, backend: str | None = None, seq_len: int | None = None):
    """The implementation 'auto' means on `backend` (default: platform(), the target platform).

    Rule: TPU -> 'splash'; GPU -> 'chunked' (the cuDNN packed-segment path is opt-in until it
    has been measured on a GPU); CPU -> 'dense' when seq_len <= CPU_DENSE_MAX_SEQ (1024) or is
    unknown, else 'chunked'. Any other impl is returned unchanged (after validation).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl!r}; valid: {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or platform()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda", "rocm"):
        return "chunked"
    if seq_len is not None and seq_len > CPU_DENSE_MAX_SEQ:
        return "chunked"
    return "dense"


def segment_causal_mask(segment_ids_BS):
    """[B, 1, S, S] bool: query q sees key k iff k <= q, same segment, and not padding (id 0)."""
    seq = segment_ids_BS.shape[1]
    causal_SS = jnp.tril(jnp.ones((seq, seq), bool))
    same_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    real_BS1 = (segment_ids_BS != 0)[:, :, None]
    return (causal_SS[None] & same_BSS & real_BS1)[:, None]


def dense_attention(q_BSHDh, k_BTKDh, v_BTKDh, mask_B1ST):
    """Softmax attention with grouped KV heads; a query whose mask row is empty outputs zeros.

    S is the query length and T the key length (equal in training; T = cache length when
    decoding with a KV cache). Same numbers as `layers.attend`.
    """
    b, s, h, dh = q_BSHDh.shape
    kv = k_BTKDh.shape[2]
    q_BSKGDh = q_BSHDh.reshape(b, s, kv, h // kv, dh)
    logits_BKGST = jnp.einsum("bskgd,btkd->bkgst", q_BSKGDh, k_BTKDh).astype(jnp.float32)
    logits_BKGST = logits_BKGST / jnp.sqrt(jnp.float32(dh))
    mask_B11ST = mask_B1ST[:, :, None]
    logits_BKGST = jnp.where(mask_B11ST, logits_BKGST, NEG_INF)
    probs_BKGST = jax.nn.softmax(logits_BKGST, axis=-1) * mask_B11ST
    out_BSKGDh = jnp.einsum("bkgst,btkd->bskgd", probs_BKGST.astype(v_BTKDh.dtype), v_BTKDh)
    return out_BSKGDh.reshape(b, s, h, dh)


def attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS, *, impl: str = "auto",
              chunk: int = 512, interpret: bool = False):
    """Causal, segment-confined attention of a training/eval row (queries = keys = S positions).

    impl: one of IMPLS ('auto' resolves by backend and S, see resolve_attention_impl).
    chunk: query and key chunk length of 'chunked'. interpret: run 'splash' in the Pallas
    interpreter (tests on CPU only).
    """
    impl = resolve_attention_impl(impl, seq_len=q_BSHDh.shape[1])
    mesh = ambient_mesh(q_BSHDh.shape[0])
    if impl == "splash" and mesh is None and not pallas_allowed():
        impl = "chunked"  # rows that do not split over the mesh: XLA partitions this call
    if impl == "cudnn":
        return cudnn_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS)
    if impl == "dense":
        return dense_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_causal_mask(segment_ids_BS))
    if impl == "chunked":
        return chunked_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS, q_chunk=chunk,
                                 kv_chunk=chunk)
    if impl == "splash":
        run = functools.partial(splash_attention, interpret=interpret)
        if mesh is not None:  # a Pallas kernel is not partitioned by XLA: run it per device
            rows = P(BATCH_AXES)
            run = jax.shard_map(run, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows,
                                check_vma=False)
        return run(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS)
    raise AssertionError(impl)


# --------------------------------------------------------------------------- chunked (XLA)


def chunked_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS, *, q_chunk: int = 512,
                      kv_chunk: int = 512):
    """Flash attention in plain XLA: equal to `dense_attention` with `segment_causal_mask`.

    Memory O(B * H * q_chunk * kv_chunk) for the scores, forward and backward (custom VJP that
    recomputes them). S need not be a multiple of the chunks: the row is padded internally with
    segment id 0 (padding), which changes nothing for the real positions.
    """
    b, s, h, dh = q_BSHDh.shape
    kv = k_BSKDh.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    if q_chunk <= 0 or kv_chunk <= 0:
        raise ValueError(f"chunks must be > 0, got q_chunk={q_chunk}, kv_chunk={kv_chunk}")
    qc, kc = min(q_chunk, s), min(kv_chunk, s)
    unit = qc * kc // math.gcd(qc, kc)
    sp = -(-s // unit) * unit
    if sp != s:
        pad = ((0, 0), (0, sp - s), (0, 0), (0, 0))
        q_BSHDh, k_BSKDh, v_BSKDh = (jnp.pad(x, pad) for x in (q_BSHDh, k_BSKDh, v_BSKDh))
        segment_ids_BS = jnp.pad(segment_ids_BS, ((0, 0), (0, sp - s)))
    q_BSKGDh = q_BSHDh.reshape(b, sp, kv, h // kv, dh)
    out = _flash(q_BSKGDh, k_BSKDh, v_BSKDh, segment_ids_BS.astype(jnp.int32), qc, kc)
    return out.reshape(b, sp, h, dh)[:, :s]


def _chunk_mask(seg_q_BC, seg_k_BC, q0, k0):
    """[B, 1, 1, Cq, Ck] bool: causal, same segment, real query."""
    qpos = q0 + jnp.arange(seg_q_BC.shape[1])
    kpos = k0 + jnp.arange(seg_k_BC.shape[1])
    causal = qpos[:, None] >= kpos[None, :]
    same = seg_q_BC[:, :, None] == seg_k_BC[:, None, :]
    real = (seg_q_BC != 0)[:, :, None]
    return (causal[None] & same & real)[:, None, None]


def _scores(q_BCKGD, k_BCKD, mask, scale):
    s = jnp.einsum("bqkgd,btkd->bkgqt", q_BCKGD, k_BCKD, preferred_element_type=jnp.float32)
    return jnp.where(mask, s * scale, NEG_INF)


def _key_chunks_needed(i, qc, kc, nk):
    """Key chunks 0..hi-1 hold every key a query of query chunk i may see (causality)."""
    return jnp.minimum(nk, ((i + 1) * qc - 1) // kc + 1)


def _flash_forward(q, k, v, seg, qc, kc):
    """(out_BSKGD in q's dtype, lse_BKGS float32; NEG_INF where a query sees no key)."""
    b, sp, kv, g, dh = q.shape
    nq, nk = sp // qc, sp // kc
    scale = 1.0 / np.sqrt(dh)

    def q_body(i, out_lse):
        out, lse = out_lse
        q_i = jax.lax.dynamic_slice_in_dim(q, i * qc, qc, axis=1)
        seg_i = jax.lax.dynamic_slice_in_dim(seg, i * qc, qc, axis=1)

        def k_body(j, carry):
            m, l, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * kc, kc, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * kc, kc, axis=1)
            seg_j = jax.lax.dynamic_slice_in_dim(seg, j * kc, kc, axis=1)
            mask = _chunk_mask(seg_i, seg_j, i * qc, j * kc)
            s = _scores(q_i, k_j, mask, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None]) * mask
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((b, kv, g, qc), NEG_INF, jnp.float32), jnp.zeros((b, kv, g, qc)),
                jnp.zeros((b, kv, g, qc, dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _key_chunks_needed(i, qc, kc, nk), k_body, init)
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        o_BCKGD = jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype)
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF)
        out = jax.lax.dynamic_update_slice_in_dim(out, o_BCKGD, i * qc, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * qc, axis=3)
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.full((b, kv, g, sp), NEG_INF, jnp.float32))
    return jax.lax.fori_loop(0, nq, q_body, init)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, qc, kc):
    return _flash_forward(q, k, v, seg, qc, kc)[0]


def _flash_fwd(q, k, v, seg, qc, kc):
    out, lse = _flash_forward(q, k, v, seg, qc, kc)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(qc, kc, residuals, dout):
    q, k, v, seg, out, lse = residuals
    b, sp, kv, g, dh = q.shape
    nq, nk = sp // qc, sp // kc
    scale = 1.0 / np.sqrt(dh)
    dout = dout.astype(q.dtype)
    # D_s = sum_d dO * O, per query (FlashAttention-2's rowsum), float32.
    delta = jnp.einsum("bskgd,bskgd->bkgs", dout.astype(jnp.float32), out.astype(jnp.float32))

    def q_body(i, carry):
        dq, dk, dv = carry
        q_i = jax.lax.dynamic_slice_in_dim(q, i * qc, qc, axis=1)
        do_i = jax.lax.dynamic_slice_in_dim(dout, i * qc, qc, axis=1)
        seg_i = jax.lax.dynamic_slice_in_dim(seg, i * qc, qc, axis=1)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, i * qc, qc, axis=3)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * qc, qc, axis=3)

        def k_body(j, inner):
            dq_i, dk, dv = inner
            k_j = jax.lax.dynamic_slice_in_dim(k, j * kc, kc, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * kc, kc, axis=1)
            seg_j = jax.lax.dynamic_slice_in_dim(seg, j * kc, kc, axis=1)
            mask = _chunk_mask(seg_i, seg_j, i * qc, j * kc)
            s = _scores(q_i, k_j, mask, scale)
            p = jnp.exp(s - lse_i[..., None]) * mask  # [B,K,G,Cq,Ck]
            dv_j = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(dout.dtype), do_i,
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,btkd->bkgqt", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bkgqt,btkd->bqkgd", ds, k_j,
                                     preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgqt,bqkgd->btkd", ds, q_i, preferred_element_type=jnp.float32)
            dk = _add_slice(dk, dk_j, j * kc)
            dv = _add_slice(dv, dv_j, j * kc)
            return dq_i, dk, dv

        init = (jnp.zeros((b, qc, kv, g, dh), jnp.float32), dk, dv)
        dq_i, dk, dv = jax.lax.fori_loop(0, _key_chunks_needed(i, qc, kc, nk), k_body, init)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * qc, axis=1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, nq, q_body, init)
    seg_ct = np.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), seg_ct


def _add_slice(acc, update, start):
    old = jax.lax.dynamic_slice_in_dim(acc, start, update.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(acc, old + update, start, axis=1)


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- cuDNN (GPU)


def segment_runs(segment_ids_BS, max_segments: int | None = None):
    """Packed-layout description of each row's segments as contiguous runs of one id.

    Returns (offsets_BM1, lengths_BM): run m of row b starts at offsets[b, m] and has
    lengths[b, m] positions; unused slots hold -1 (cuDNN's convention); padding runs (id 0) are
    listed too, as ordinary runs (their outputs are zeroed by the caller). M = max_segments
    (default S, the worst case; runs past M are dropped, so M must bound the runs per row).
    """
    b, s = segment_ids_BS.shape
    m = s if max_segments is None else max_segments
    seg = segment_ids_BS
    start_BS = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_BS = jnp.cumsum(start_BS, axis=1, dtype=jnp.int32) - 1  # run index of every position
    rows_B1 = jnp.arange(b)[:, None]
    pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    offsets = jnp.full((b, m + 1), -1, jnp.int32).at[
        rows_B1, jnp.where(start_BS, run_BS, m + 1)].set(pos_BS, mode="drop")
    lengths = jnp.zeros((b, m), jnp.int32).at[rows_B1, run_BS].add(1, mode="drop")
    lengths = jnp.where(jnp.arange(m) < run_BS[:, -1:] + 1, lengths, -1)
    return offsets, lengths


def cudnn_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS, *, max_segments=None):
    """cuDNN flash attention with packed segments (NVIDIA GPU, bf16/fp16 inputs only).

    Each segment must be one contiguous run of positions (the packer's layout); padding
    (id 0) outputs zeros.
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # private: packed layout

    if q_BSHDh.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention 'cudnn' needs bfloat16/float16 inputs, got {q_BSHDh.dtype}")
    offsets, lengths = segment_runs(segment_ids_BS, max_segments)
    out = cudnn.dot_product_attention(
        q_BSHDh, k_BSKDh, v_BSKDh, None, None, lengths, lengths, offsets, offsets,
        scale=1.0 / float(np.sqrt(q_BSHDh.shape[-1])), mask_type=cudnn.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH")
    return out * (segment_ids_BS != 0)[:, :, None, None].astype(out.dtype)


# --------------------------------------------------------------------------- splash (TPU)


def splash_attention(q_BSHDh, k_BSKDh, v_BSKDh, segment_ids_BS, *, block: int = 512,
                     interpret: bool = False):
    """Pallas splash attention (TPU) with SegmentIds and a causal mask.

    Grouped heads run as one MQA kernel per key/value head. S must be a multiple of 128 (the
    kernel's tiling). Padding (id 0) outputs zeros. `interpret` runs the kernel in the Pallas
    interpreter (slow; CPU tests only); otherwise it only lowers on TPU.
    """
    if not interpret and platform() != "tpu":
        raise ValueError("attention 'splash' runs only on TPU (the backend is "
                         f"{platform()!r}); use 'chunked' or 'auto'")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, dh = q_BSHDh.shape
    kv = k_BSKDh.shape[2]
    g = h // kv
    if s % 128:
        raise ValueError(f"attention 'splash' needs S ({s}) to be a multiple of 128")
    blk = min(block, s)
    sizes = sk.BlockSizes(block_q=blk, block_kv_compute=blk, block_kv=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(g)])
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    scale = 1.0 / np.sqrt(dh)
    q_BKGSD = jnp.transpose(q_BSHDh.reshape(b, s, kv, g, dh), (0, 2, 3, 1, 4))
    q_BKGSD = (q_BKGSD.astype(jnp.float32) * scale).astype(q_BSHDh.dtype)
    k_BKSD = jnp.transpose(k_BSKDh, (0, 2, 1, 3))
    v_BKSD = jnp.transpose(v_BSKDh, (0, 2, 1, 3))
    seg = segment_ids_BS.astype(jnp.int32)

    def one_row(q_KGSD, k_KSD, v_KSD, seg_S):
        ids = sk.SegmentIds(q=seg_S, kv=seg_S)
        return jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=ids))(
            q_KGSD, k_KSD, v_KSD)

    out_BKGSD = jax.vmap(one_row)(q_BKGSD, k_BKSD, v_BKSD, seg)
    out = jnp.transpose(out_BKGSD, (0, 3, 1, 2, 4)).reshape(b, s, h, dh)
    return out * (segment_ids_BS != 0)[:, :, None, None].astype(out.dtype)
