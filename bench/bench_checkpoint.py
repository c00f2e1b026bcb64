"""Checkpoint stall and memory: what saving costs the training loop, and what a model and its
optimizer state weigh in full and as 25% / 12.5% expert subsets.

    python bench/bench_checkpoint.py [--config=configs/small.py] [--steps=20]

Stall: the mean step time when an asynchronous Orbax checkpoint is started after every step
(emo_jax.train.checkpoint.Checkpointer, as the training loop saves) over the mean step time
without saving, same run. Memory: float32 bytes of parameters and AdamW state from the model
summary, the bytes of the checkpoint written, and the same for extracted subsets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from bench.bench_train_step import compiled_step, load_config
from bench.common import write_results
from emo_jax.config import validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.summary import summarize
from emo_jax.modular.extract import extracted_config
from emo_jax.train.checkpoint import Checkpointer


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed_steps(train_step, state, batch, steps, after_step=None):
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        if after_step is not None:
            after_step(i, state)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return state, float(np.mean(times[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    config = validate(load_config(args.config))
    train_step, state, batch = compiled_step(config)

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        config.checkpoint.keep = 2
        ckpt = Checkpointer(workdir, config)
        state, plain = timed_steps(train_step, state, batch, args.steps)

        def save(i, state):
            ckpt.save(1000 + i, state, {"num_shards": 0, "shards": []}, {"step": 1000 + i})

        state, saving = timed_steps(train_step, state, batch, args.steps, save)
        ckpt.wait()
        last = os.path.join(workdir, "checkpoints", str(ckpt.latest_step()))
        ckpt_bytes = dir_bytes(last)
        ckpt.close()
    rows.append({"what": "async save every step", "step_ms_plain": 1e3 * plain,
                 "step_ms_saving": 1e3 * saving, "stall_ratio": saving / plain,
                 "checkpoint_mb": ckpt_bytes / 2 ** 20})

    memory = []
    e = config.moe
    for label, keep in (("full", e.num_experts), ("25%", round(0.25 * e.num_experts)),
                        ("12.5%", round(0.125 * e.num_experts))):
        cfg = config if keep == e.num_experts else extracted_config(config, keep)
        s = summarize(ModelConfig.from_config(cfg), cfg.data.seq_len)
        memory.append({"model": label, "experts": keep, "params": s["total_params"],
                       "param_mb": s["param_bytes_float32"] / 2 ** 20,
                       "adam_state_mb": s["adam_state_bytes_float32"] / 2 ** 20})
    write_results("checkpoint", rows + [dict(m, what="memory") for m in memory],
                  {"args": vars(args)})


if __name__ == "__main__":
    main()
