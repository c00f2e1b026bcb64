"""Expert parallelism on 8 CPU devices: all-to-all traffic against its theoretical minimum, and
the dropped-assignment rate of the capacity dispatch under EMO vs. standard routing.

    python bench/bench_expert_parallel.py [--steps 300] [--eval_batches 4]

1. Traffic: the compiled HLO's all-to-all ops of one MoE layer (the scanned block body holds one
   layer), bytes that leave each device, summed over devices, against the minimum
   2 * tokens * top_k * d_model * bytes * (EP-1)/EP * capacity_factor
   (dispatch + combine, the part of each capacity buffer that crosses devices). Forward pass,
   and the train step (forward + backward: twice the minimum). `ratio_lowered` counts the
   dtypes the program asks for: XLA:CPU upcasts bf16 all-to-alls to f32, GPU/TPU do not.
2. Drops: an EMO and a standard MoE (same config, `moe.pool` 'document' vs 'none') trained for
   --steps on the bundled corpus (one device, dropless), then run on a (1, 1, 8) mesh with the
   capacity dispatch at capacity factors 1.0, 1.25, 2.0 on training batches with training-time
   routing (EMO's document pools on): dropped / routed assignments, with 256 and 1024 tokens per
   device. Also the capacity factor at which nothing would drop (the fullest (device, expert)
   buffer over its fair share).

Writes bench/out/expert_parallel.json.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import write_results  # noqa: E402
from emo_jax import parallel  # noqa: E402
from emo_jax.config import default_config, validate  # noqa: E402
from emo_jax.data.pipeline import make_train_iterator  # noqa: E402
from emo_jax.model.transformer import Transformer  # noqa: E402
from emo_jax.model.model_config import ModelConfig
from emo_jax.train.loss import loss_and_metrics  # noqa: E402

FACTORS = (1.0, 1.25, 2.0)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # the traffic programs are never run


def bench_config(pool="document", mesh=(1, 1, 8), factor=1.25, dtype="float32"):
    """configs/tiny.py's model with 16 routed experts (divisible by every EP here)."""
    c = default_config()
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                   compute_dtype=dtype)
    c.moe.update(num_experts=17, num_shared_experts=1, top_k=2, expert_hidden=64, pool_min=4,
                 pool_max=16, pool=pool, dispatch="capacity", capacity_factor=factor)
    c.data.update(seq_len=128, batch_size=16)
    c.train.update(lr=3e-3)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], expert=mesh[2])
    return validate(c)


def init_state(config):
    model_config = ModelConfig.from_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.state(Transformer(model_config, rngs=nnx.Rngs(0))))()
    return graphdef, state


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
    """(ops, bytes leaving each device) of the all-to-alls in compiled HLO text.

    XLA:CPU prints an all-to-all as a tuple with one operand per peer; one of them stays home.
    """
    ops, leaving = 0, 0
    for line in hlo_text.splitlines():
        m = re.search(r"= (\(.*?\)|\S+) all-to-all(?:-start)?\(", line)
        if not m:
            continue
        parts = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _bytes(dtype)
                 for dtype, dims in parts]
        groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
        peers = len(groups.group(1).split(",")) if groups else len(sizes)
        total = sum(sizes)
        ops += 1
        leaving += total - total // peers
    return ops, leaving


def _bytes(dtype: str) -> int:
    return {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "u32": 4, "pred": 1}[dtype]


def lowered_all_to_all_bytes(stablehlo_text: str, peers: int) -> int:
    """Bytes leaving each device per the lowered program (the dtypes it asks for).

    XLA:CPU upcasts bf16 all-to-alls to f32 when it compiles (measured here); GPU and TPU
    send bf16, so this is what they move.
    """
    leaving = 0
    for m in re.finditer(r"stablehlo.all_to_all.*?: \(tensor<([\dx]+)x(\w+)>\)", stablehlo_text):
        dims, dtype = m.group(1), m.group(2)
        size = math.prod(int(d) for d in dims.split("x")) * {"f32": 4, "bf16": 2, "i32": 4}[dtype]
        leaving += size - size // peers
    return leaving


def traffic_rows():
    rows = []
    batch_np = {k: np.zeros((16, 128), np.int32) for k in ("tokens", "positions")}
    batch_np["segment_ids"] = np.ones((16, 128), np.int32)
    cases = [(ep, f, "float32", False) for ep in (2, 4, 8) for f in FACTORS]
    cases += [(8, 1.25, "bfloat16", False)] + [(ep, 1.25, "float32", True) for ep in (2, 4, 8)]
    for ep, factor, dtype, train in cases:
        config = bench_config(mesh=(8 // ep, 1, ep), factor=factor, dtype=dtype)
        mesh = parallel.make_mesh(config)
        graphdef, state = init_state(config)

        def loss(state, batch):
            return loss_and_metrics(nnx.merge(graphdef, state), batch, config,
                                    jax.random.key(0))[0]

        fn = jax.grad(loss) if train else loss
        with jax.set_mesh(mesh):
            state = jax.device_put(state, parallel.state_shardings(state, mesh, config))
            batch = parallel.host_to_global(batch_np, mesh)
            lowered = jax.jit(fn, compiler_options=FAST_COMPILE).lower(state, batch)
            text = lowered.compile().as_text()
        ops, leaving = all_to_all_bytes(text)
        leaving_lowered = lowered_all_to_all_bytes(lowered.as_text(), ep)
        tokens = 16 * 128
        width = jnp.dtype(dtype).itemsize
        minimum = (2 * tokens * config.moe.top_k * config.model.d_model * width
                   * (ep - 1) / ep * factor)
        measured = leaving * 8  # every device sends the same amount
        rows.append({"pass": "fwd+bwd" if train else "fwd", "EP": ep, "capacity_factor": factor,
                     "dtype": dtype, "a2a_ops": ops, "bytes_per_layer": measured,
                     "minimum_bytes": int(minimum * (2 if train else 1)),
                     "ratio": measured / (minimum * (2 if train else 1)),
                     "ratio_lowered": leaving_lowered * 8 / (minimum * (2 if train else 1))})
        print(rows[-1], flush=True)
    return rows


def train(config, steps: int, it):
    """A few hundred AdamW steps on one device (dropless local path)."""
    graphdef, state = init_state(config)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(config.train.lr))
    opt_state = tx.init(state)

    @jax.jit
    def step(state, opt_state, batch, key):
        def loss(state):
            return loss_and_metrics(nnx.merge(graphdef, state), batch, config, key)[0]

        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    value = float("nan")
    for i in range(steps):
        state, opt_state, value = step(state, opt_state, next(it), jax.random.key(i))
    return graphdef, state, float(value)


def drop_rows(steps: int, eval_batches: int):
    rows = []
    for pool in ("document", "none"):
        base = bench_config(pool=pool)
        it = make_train_iterator(base)
        held_out = [next(it) for _ in range(eval_batches)]  # routing measured on these
        # Tokens per device matter: 2 rows (256 tokens) per device, or the same rows as one
        # global batch (with the default 4 batches, 8 rows per device).
        joined = {k: np.concatenate([b[k] for b in held_out]) for k in held_out[0]}
        layouts = {len(held_out[0]["tokens"]) // 8: held_out, len(joined["tokens"]) // 8: [joined]}
        for trained in (0, steps):
            start = time.time()
            graphdef, state, final_loss = (train(base, trained, it) if trained
                                           else (*init_state(base), float("nan")))
            for rows_per_device, batches in layouts.items():
                worst = zero_drop_factor(graphdef, state, batches, base)
                for factor in FACTORS:
                    dropped, routed = capacity_drops(state, batches, pool, factor)
                    rows.append({"routing": "EMO" if pool == "document" else "standard",
                                 "trained_steps": trained, "train_loss": final_loss,
                                 "tokens_per_device": rows_per_device * base.data.seq_len,
                                 "capacity_factor": factor, "dropped_rate": dropped / routed,
                                 "zero_drop_factor": worst})
                    print(rows[-1], f"{time.time() - start:.0f}s", flush=True)
    return rows


def capacity_drops(state, batches, pool, factor):
    """(dropped, routed) assignments of the capacity dispatch on a (1, 1, 8) mesh."""
    config = bench_config(pool=pool, factor=factor)
    mesh = parallel.make_mesh(config)
    # The capacity factor is static in the modules: a graphdef per factor.
    model_config = ModelConfig.from_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    dropped = routed = 0.0
    with jax.set_mesh(mesh):
        placed = jax.device_put(state, parallel.state_shardings(state, mesh, config))
        run = jax.jit(lambda s, b, k: loss_and_metrics(nnx.merge(graphdef, s), b, config, k)[1],
                      compiler_options=FAST_COMPILE)
        for j, batch in enumerate(batches):
            m = run(placed, parallel.host_to_global(batch, mesh), jax.random.key(10_000 + j))
            dropped += float(m["dropped_tokens"])
            routed += float(m["counts_LR"].sum())
    return dropped, routed


def zero_drop_factor(graphdef, state, batches, config, devices=8):
    """Capacity factor at which nothing drops on `devices` expert-parallel devices: the fullest
    (device, expert) buffer over the fair share T_local * K / E, over the batches."""
    @jax.jit
    def counts(state, batch, key):
        out = nnx.merge(graphdef, state)(batch["tokens"], batch["segment_ids"],
                                         batch["positions"], pool_key=key)
        return out.routing.counts_BR  # [L, B, R]

    worst = 0.0
    for j, batch in enumerate(batches):  # same pools as the capacity runs (same keys)
        c = np.asarray(counts(state, batch, jax.random.key(10_000 + j)))
        per_device = c.reshape(c.shape[0], devices, -1, c.shape[-1]).sum(2)  # contiguous rows
        fair = c.shape[1] // devices * config.data.seq_len * config.moe.top_k / c.shape[-1]
        worst = max(worst, float(per_device.max() / fair))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per model")
    ap.add_argument("--eval_batches", type=int, default=4)
    args = ap.parse_args()
    traffic = traffic_rows()
    write_results("expert_parallel_traffic", traffic)
    drops = drop_rows(args.steps, args.eval_batches)
    write_results("expert_parallel", drops, {"traffic": traffic, "steps": args.steps})


if __name__ == "__main__":
    main()
