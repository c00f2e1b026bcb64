"""Train-step throughput and FLOP utilisation of a config, with a matmul yardstick timed in the
same run.

    python bench/bench_train_step.py --config=configs/tiny.py --config=configs/small.py
    python bench/bench_train_step.py --config=configs/emo_1b14b.py --layers=2 --batch=4 \\
        --seq=4096 --block_size=256          # one layer-slice of the reference, on a GPU

For each config: the real jitted train step (emo_jax.train.step: forward, backward, AdamW,
donated state) on packed random documents. Reported: step time, tokens/s, model TFLOP/s from
the summary's FLOPs-per-token formula, utilisation against (a) a plain large matmul in the
compute dtype timed here (the machine's practical peak) and (b) the device's nominal peak where
known (emo_jax.train.metrics.PEAK_TFLOPS: GPUs/TPUs). Also EMO over standard-MoE step time
(same model, `moe.pool='none'`): the cost of the document pools.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_compiled, write_results
from emo_jax import parallel
from emo_jax.config import validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.summary import summarize
from emo_jax.train import step as step_lib
from emo_jax.train.metrics import peak_tflops


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arg = path.split(":", 1)[1] if ":" in path else None
    return module.get_config(arg) if arg is not None else module.get_config()


def matmul_peak_tflops(dtype, n: int) -> float:
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    seconds = time_compiled(jax.jit(lambda a, b: a @ b), a, b, repeats=10)
    return 2 * n ** 3 / seconds / 1e12


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, vocab, (batch, seq)).astype(np.int32)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        at, sid = 0, 1
        while at < seq:
            n = min(int(rng.integers(seq // 16, seq // 2)), seq - at)
            seg[b, at:at + n], pos[b, at:at + n] = sid, np.arange(n)
            at, sid = at + n, sid + 1
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def compiled_step(config):
    """(train_step, state, batch): the real train step, compiled and run once, on packed docs."""
    mesh = parallel.make_mesh(config)
    graphdef, state, shardings = step_lib.init_state(config, mesh)
    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    batch = parallel.host_to_global(
        packed_batch(config.data.batch_size, config.data.seq_len, config.model.vocab_size), mesh)
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    return train_step, state, batch


def step_time(config, repeats: int) -> float:
    train_step, state, batch = compiled_step(config)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--layers", type=int, default=0, help="override model.num_layers")
    p.add_argument("--batch", type=int, default=0, help="override data.batch_size")
    p.add_argument("--seq", type=int, default=0, help="override data.seq_len")
    p.add_argument("--block_size", type=int, default=0, help="override moe.block_size")
    p.add_argument("--dtype", default="", help="override model.compute_dtype")
    p.add_argument("--remat", default="", help="override model.remat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul_n", type=int, default=0, help="yardstick matmul size (0: auto)")
    p.add_argument("--no_standard", action="store_true", help="skip the standard-MoE twin")
    args = p.parse_args()

    rows = []
    for path in args.config:
        config = load_config(path)
        overrides = {("model", "num_layers"): args.layers, ("data", "batch_size"): args.batch,
                     ("data", "seq_len"): args.seq, ("moe", "block_size"): args.block_size,
                     ("model", "compute_dtype"): args.dtype, ("model", "remat"): args.remat}
        for (section, key), value in overrides.items():
            if value:
                config[section][key] = value
        config.train.micro_batches = 1
        config = validate(config)
        dtype = jnp.dtype(config.model.compute_dtype)
        n = args.matmul_n or (8192 if jax.default_backend() == "gpu" else 2048)
        yardstick = matmul_peak_tflops(dtype, n)
        figures = summarize(ModelConfig.from_config(config), config.data.seq_len)
        tokens = config.data.batch_size * config.data.seq_len
        seconds = {}
        for pool in ("document",) if args.no_standard else ("document", "none"):
            config.moe.pool = pool
            seconds[pool] = step_time(config, args.repeats)
        tflops = figures["flops_per_token"] * tokens / seconds["document"] / 1e12
        nominal = peak_tflops(config, jax.devices()[0].device_kind)
        rows.append({
            "config": path, "layers": config.model.num_layers, "tokens_per_step": tokens,
            "dtype": str(dtype), "step_s": seconds["document"],
            "tokens_per_s": tokens / seconds["document"], "model_tflops": tflops,
            "matmul_tflops": yardstick, "util_vs_matmul": tflops / yardstick,
            "mfu_vs_nominal": tflops / nominal / jax.device_count() if nominal else None,
            "emo_over_standard": (seconds["document"] / seconds["none"]
                                  if "none" in seconds else None),
            "active_params": figures["active_params"], "total_params": figures["total_params"],
        })
    write_results("train_step", rows, {"args": vars(args)})


if __name__ == "__main__":
    main()
