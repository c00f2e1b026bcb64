"""A few optimizer steps of a tiny EMO model on a device mesh, for tests/test_multihost.py.

Run as one of several processes (each with its own CPU devices, gloo collectives):
  python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num_processes 2 \
      --process_id I --devices 4 --mesh 1,1,8 --out losses_I.json
or imported, in a process that already sees all devices, to get the reference losses:
  losses = run_steps(mesh_shape=(1, 1, 8))
Every process builds the same global batches and feeds only its own rows
(`parallel.process_rows` -> `parallel.host_to_global`), as a multi-host data pipeline does.
"""

from __future__ import annotations

import argparse
import json
import os


def tiny_config(mesh_shape):
    from emo_jax.config import default_config

    c = default_config()
    c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                   head_dim=16)
    c.moe.update(num_experts=8, top_k=2, expert_hidden=48, pool_min=2, pool_max=8,
                 capacity_factor=4.0, block_size=8)
    c.data.update(seq_len=16, batch_size=16)
    c.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], expert=mesh_shape[2])
    return c


def global_batch(step: int, rows: int, seq: int, vocab: int):
    """A deterministic packed batch (several documents per row, padding at the end)."""
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    seg = np.zeros((rows, seq), np.int32)
    pos = np.zeros((rows, seq), np.int32)
    for b in range(rows):
        p, sid = 0, 1
        end = seq - int(rng.integers(0, seq // 4))
        while p < end:
            n = min(int(rng.integers(1, seq // 2)), end - p)
            seg[b, p:p + n], pos[b, p:p + n] = sid, np.arange(n)
            p, sid = p + n, sid + 1
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def run_steps(mesh_shape, steps: int = 3):
    """Losses of `steps` AdamW steps of the tiny model on a mesh over all (global) devices."""
    import jax
    import optax
    from flax import nnx

    from emo_jax import parallel
    from emo_jax.model.transformer import Transformer
    from emo_jax.model.model_config import ModelConfig
    from emo_jax.train.loss import loss_and_metrics

    config = tiny_config(mesh_shape)
    mesh = parallel.make_mesh(config)
    parallel.check_experts(config, mesh)
    parallel.check_batch(config, mesh)
    def create():
        model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    with jax.set_mesh(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = parallel.state_shardings(abstract, mesh, config)
        # Created by one jitted program, already sharded (eagerly, op by op: 4x the CPU time).
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()

        def train_step(state, batch, key):
            model, optimizer = nnx.merge(graphdef, state)

            def loss_fn(model):
                return loss_and_metrics(model, batch, config, key)

            (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss, metrics["dropped_tokens"]

        # Unoptimised machine code compiles twice as fast; these steps run on tiny arrays.
        step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None, None),
                          compiler_options={"xla_backend_optimization_level": 0})
        rows = parallel.process_rows(mesh, config.data.batch_size)
        losses = []
        for step in range(steps):
            batch = global_batch(step, config.data.batch_size, config.data.seq_len,
                                 config.model.vocab_size)
            local = {k: v[rows] for k, v in batch.items()}
            state, loss, dropped = step_fn(state, parallel.host_to_global(local, mesh),
                                           jax.random.key(step))
            assert float(dropped) == 0.0
            losses.append(float(loss))
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--mesh", default="1,1,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from train_helpers import FAST_COMPILE  # this script's folder is on sys.path

    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               f"{FAST_COMPILE}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from emo_jax import parallel

    how = parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    assert how == "explicit" and jax.process_count() == args.num_processes, how
    assert jax.device_count() == args.devices * args.num_processes
    losses = run_steps(tuple(int(s) for s in args.mesh.split(",")), args.steps)
    with open(args.out, "w") as f:
        json.dump({"process": jax.process_index(), "losses": losses}, f)


if __name__ == "__main__":
    main()
