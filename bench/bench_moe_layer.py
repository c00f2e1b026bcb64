"""MoE layer forward+backward time over a dense SwiGLU with the same active FLOPs.

    python bench/bench_moe_layer.py [--experts 8,32,64] [--tokens 4096]

Same tokens, d_model and expert hidden F; the dense yardstick has hidden top_k * F, so both do
the same matmul FLOPs per token. A ratio near 1, flat in the number of experts, means the MoE
layer's cost follows the routed work, not the expert count. Run for EMO document pools and
standard routing; also reports the rows the expert matmuls processed over tokens * top_k.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import time_compiled, write_results
from emo_jax.config import default_config
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.moe import MoE


def dense_swiglu_layer(d, hidden, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = (0.02 * jax.random.normal(k1, (d, hidden)), 0.02 * jax.random.normal(k2, (d, hidden)),
              0.02 * jax.random.normal(k3, (hidden, d)))

    def loss(params, x):
        wg, wu, wd = params
        return jnp.sum((jax.nn.silu(x @ wg) * (x @ wu)) @ wd)

    return params, jax.jit(jax.grad(loss, argnums=(0, 1)))


def moe_fwd_bwd(config, x, seg, pool, key):
    layer = MoE(ModelConfig.from_config(config), rngs=nnx.Rngs(0))
    pool_size = (jax.random.randint(key, seg.shape, config.moe.pool_min, config.moe.pool_max + 1)
                 if pool == "document" else None)

    @nnx.jit
    def step(layer, x):
        def loss(layer, x):
            y, stats, _ = layer(x, seg, pool_size)
            return jnp.sum(y), stats.rows_processed
        (_, rows), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return grads, rows

    return step, layer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--block_size", type=int, default=default_config().moe.block_size)
    p.add_argument("--impl", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    rows_b = args.tokens // args.seq
    x = jnp.asarray(rng.normal(size=(rows_b, args.seq, args.d_model)).astype(np.float32))
    # Packed rows of documents of 16..128 tokens, as the pipeline makes them.
    seg = np.zeros((rows_b, args.seq), np.int32)
    for b in range(rows_b):
        at, sid = 0, 1
        while at < args.seq:
            n = int(rng.integers(16, 129))
            seg[b, at:at + n], at, sid = sid, at + n, sid + 1
    seg = jnp.asarray(seg)

    params, dense_step = dense_swiglu_layer(args.d_model, args.top_k * args.hidden, jax.random.key(0))
    dense_s = time_compiled(dense_step, params, x.reshape(-1, args.d_model), repeats=args.repeats)
    results = []
    for experts in map(int, args.experts.split(",")):
        for pool in ("document", "none"):
            c = default_config()
            c.model.d_model = args.d_model
            c.moe.update(num_experts=experts, num_shared_experts=0, top_k=args.top_k,
                         expert_hidden=args.hidden, pool=pool, pool_min=args.top_k,
                         pool_max=experts, grouped_matmul=args.impl, block_size=args.block_size)
            step, layer = moe_fwd_bwd(c, x, seg, pool, jax.random.key(1))
            moe_s = time_compiled(step, layer, x, repeats=args.repeats)
            _, rows = step(layer, x)
            results.append({"experts": experts, "routing": "emo" if pool == "document" else "standard",
                            "moe_ms": 1e3 * moe_s, "dense_ms": 1e3 * dense_s,
                            "moe_over_dense": moe_s / dense_s,
                            "rows_over_tokens_topk": float(rows) / (args.tokens * args.top_k)})
    write_results("moe_layer", results, {"args": vars(args)})


if __name__ == "__main__":
    main()
