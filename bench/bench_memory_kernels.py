"""Memory and speed of the memory-efficient kernels against today's dense ones.

    python -m bench.bench_memory_kernels [--skip-time] [--repeats=3]

Memory: XLA's compiled temporary bytes of a jitted value_and_grad at the reference recipe's
sizes (configs/emo_1b14b.py: bf16 compute, one 4,096-token row for attention, 16,384 tokens
and a 100,352 vocabulary for the head + cross-entropy, 4,096 tokens x top-7 = 28,672 expert
rows for the grouped matmul), from `.lower(abstract args).compile().memory_analysis()`:
nothing is run. Speed: median wall time of value_and_grad at smaller shapes, as a ratio to the
dense implementation, measured in the same run (this backend). Prints a markdown table and
writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_compiled, write_results
from emo_jax.model import attention as attn
from emo_jax.model.cross_entropy import chunked_head_cross_entropy, head_logits, token_cross_entropy
from emo_jax.model.grouped_matmul import grouped_swiglu

SDS = jax.ShapeDtypeStruct


# ------------------------------------------------------------------ the three kernels' losses

def attention_loss(impl, chunk):
    def loss(q, k, v, seg):
        if impl == "dense":
            out = attn.dense_attention(q, k, v, attn.segment_causal_mask(seg))
        else:
            out = attn.chunked_attention(q, k, v, seg, q_chunk=chunk, kv_chunk=chunk)
        return jnp.sum(out.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def ce_loss(chunk, dtype):
    def loss(x, head, targets, mask):
        if chunk:
            loss_T, lse_T = chunked_head_cross_entropy(x, head, targets, chunk=chunk,
                                                       compute_dtype=dtype)
        else:
            loss_T, lse_T = token_cross_entropy(head_logits(x, head, dtype), targets)
        m = mask.astype(jnp.float32)
        return jnp.sum(loss_T * m) + 1e-5 * jnp.sum(lse_T ** 2 * m)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def gmm_loss(chunk_blocks, block, dtype):
    def loss(x, group_sizes, wg, wu, wd):
        y, _ = grouped_swiglu(x, group_sizes, wg, wu, wd, impl="blocked", block_size=block,
                              compute_dtype=dtype, chunk_blocks=chunk_blocks)
        return jnp.sum(y.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))


# ------------------------------------------------------------------ shapes

def attention_args(b, s, h, dh, dtype, concrete=False):
    shapes = [((b, s, h, dh), dtype)] * 3 + [((b, s), jnp.int32)]
    if not concrete:
        return [SDS(sh, dt) for sh, dt in shapes]
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    qkv = [jax.random.normal(kk, sh).astype(dt) for kk, (sh, dt) in zip(ks, shapes)]
    seg = np.repeat(np.arange(1, 5, dtype=np.int32), -(-s // 4))[:s][None].repeat(b, 0)
    return qkv + [jnp.asarray(seg)]


def ce_args(t, d, v, concrete=False):
    shapes = [((t, d), jnp.float32), ((d, v), jnp.float32), ((t,), jnp.int32), ((t,), jnp.bool_)]
    if not concrete:
        return [SDS(sh, dt) for sh, dt in shapes]
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(ks[0], (t, d)), 0.02 * jax.random.normal(ks[1], (d, v)),
            jax.random.randint(ks[2], (t,), 0, v), jnp.ones((t,), bool)]


def gmm_args(a, d, f, r, x_dtype, concrete=False):
    shapes = [((a, d), x_dtype), ((r,), jnp.int32), ((r, d, f), jnp.float32),
              ((r, d, f), jnp.float32), ((r, f, d), jnp.float32)]
    if not concrete:
        return [SDS(sh, dt) for sh, dt in shapes]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    sizes = np.full((r,), a // r, np.int32)
    sizes[: a - sizes.sum()] += 1
    return [jax.random.normal(ks[0], (a, d)).astype(x_dtype), jnp.asarray(sizes)] + [
        0.02 * jax.random.normal(kk, sh) for kk, (sh, _) in zip(ks[1:], shapes[2:])]


def temp_bytes(fn, args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


# ------------------------------------------------------------------ main

def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bf16 = jnp.bfloat16
    rows = []

    def add(kernel, shape, variant, fn, fn_args, baseline=None):
        temp = temp_bytes(fn, fn_args)
        row = {"kernel": kernel, "shape": shape, "variant": variant,
               "temp_GiB": round(temp / 2**30, 3)}
        if baseline is not None:
            row["vs_dense"] = f"{temp / baseline:.3f}x"
        rows.append(row)
        print(row, flush=True)
        return temp

    # Memory at the reference recipe's sizes (compile only).
    shape = "B=1 H=16 S=4096 Dh=128 bf16"
    a_args = attention_args(1, 4096, 16, 128, bf16)
    base = add("attention", shape, "dense", attention_loss("dense", 0), a_args)
    for c in (512, 1024):
        add("attention", shape, f"chunked {c}", attention_loss("chunked", c), a_args, base)

    shape = "T=16384 D=2048 V=100352 bf16 matmul"
    c_args = ce_args(16384, 2048, 100_352)
    base = add("head+CE", shape, "dense logits", ce_loss(0, bf16), c_args)
    for c in (1024, 4096):
        add("head+CE", shape, f"chunked {c}", ce_loss(c, bf16), c_args, base)

    shape = "A=28672 D=2048 F=1024 R=127 block 128 bf16"
    g_args = gmm_args(28672, 2048, 1024, 127, bf16)
    base = add("blocked GMM", shape, "unchunked", gmm_loss(0, 128, bf16), g_args)
    for c in (16, 32):
        add("blocked GMM", shape, f"chunk_blocks {c}", gmm_loss(c, 128, bf16), g_args, base)

    # Speed at small shapes, float32 (ratios in this run).
    times = []
    if not args.skip_time:
        def timed(kernel, shape, variant, fn, fn_args, baseline=None):
            t = time_compiled(fn, *fn_args, repeats=args.repeats, warmup=1)
            row = {"kernel": kernel, "shape": shape, "variant": variant, "ms": round(t * 1e3, 1)}
            if baseline is not None:
                row["vs_dense"] = f"{t / baseline:.2f}x"
            times.append(row)
            print(row, flush=True)
            return t

        shape = "B=1 H=4 S=1024 Dh=64 f32"
        a = attention_args(1, 1024, 4, 64, jnp.float32, concrete=True)
        base = timed("attention", shape, "dense", attention_loss("dense", 0), a)
        for c in (128, 256):
            timed("attention", shape, f"chunked {c}", attention_loss("chunked", c), a, base)
        shape = "T=2048 D=256 V=8192 f32"
        a = ce_args(2048, 256, 8192, concrete=True)
        base = timed("head+CE", shape, "dense logits", ce_loss(0, jnp.float32), a)
        for c in (256, 1024):
            timed("head+CE", shape, f"chunked {c}", ce_loss(c, jnp.float32), a, base)
        shape = "A=4096 D=256 F=128 R=32 block 64 f32"
        a = gmm_args(4096, 256, 128, 32, jnp.float32, concrete=True)
        base = timed("blocked GMM", shape, "unchunked", gmm_loss(0, 64, jnp.float32), a)
        for c in (16, 32):
            timed("blocked GMM", shape, f"chunk_blocks {c}", gmm_loss(c, 64, jnp.float32), a,
                  base)

    print("\n" + _markdown(rows))
    if times:
        print("\n" + _markdown(times))
    write_results("memory_kernels", rows + times)


def _markdown(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
