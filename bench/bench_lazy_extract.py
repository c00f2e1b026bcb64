"""Peak memory and time of lazy extraction from a checkpoint shaped like configs/emo_1b14b.py.

    python bench/bench_lazy_extract.py [--workdir=/tmp/emo_bench_lazy] [--layers=16] [--keep]

1. Writes a model directory with the emo_1b14b shapes (16 layers, d_model 2048, 128 experts of
   SwiGLU 1024 = 127 routed + 1 shared, vocabulary 100,352) and random bfloat16 weights, about
   27 GB, streamed layer by layer (`emo_jax.modular.lazy.write_params`), so it is never whole in
   memory (the weights: random bits with the exponent's high bits fixed, |w| in
   [2^-7, 2^-3), cheap to draw). --layers=N writes fewer layers if the disk is short (checked
   first).
2. Extracts random 12.5% (K=16) and 25% (K=32) subsets with `python -m emo_jax.extract` (lazy,
   the default), each in a fresh process, and reads that process's peak RSS (VmHWM) and time;
   a process that only imports the same modules gives the baseline.
3. Prints a table, writes bench/out/lazy_extract.json, and deletes the checkpoint and the
   extracted models (unless --keep).

The eager path is not run at this size: it restores the model in float32 (55 GB), more than
this machine's memory. Timings read a checkpoint just written (partly in the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import write_results  # noqa: E402
from configs.emo_1b14b import get_config  # noqa: E402
from emo_jax.config import routed_experts
from emo_jax.model.model_config import ModelConfig  # noqa: E402
from emo_jax.model.transformer import Transformer  # noqa: E402
from emo_jax.modular import lazy, subset as subset_lib  # noqa: E402

BASELINE = """
import json
from emo_jax.modular import extract, lazy, runtime, subset
from emo_jax import model_files
import jax; jax.devices()
print(json.dumps({"peak": lazy.peak_rss_bytes()}))
"""


def random_bf16(rng, shape):
    """Random bfloat16 weights: random sign, mantissa and 2 low exponent bits, the exponent's
    high bits fixed: |w| in [2^-7, 2^-3) (about 10 random bits of 16, like trained weights'
    entropy, so zstd compresses them about as much)."""
    count = int(np.prod(shape))
    bits = np.frombuffer(rng.bytes(2 * count), np.uint16).copy()
    bits &= 0x81FF  # sign, 2 low exponent bits, mantissa
    bits |= 0x3C00  # exponent 120 + (0..3)
    return bits.view(ml_dtypes.bfloat16).reshape(shape)


def write_checkpoint(path: str, layers: int, seed: int = 0):
    """The emo_1b14b-shaped model directory with random bfloat16 weights, streamed."""
    config = get_config()
    config.model.num_layers = layers
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0)))))
    shapes = {"/".join(str(k.key) for k in path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    rng = np.random.default_rng(seed)
    dtype = np.dtype(ml_dtypes.bfloat16)
    plans = {}
    for name, shape in shapes.items():  # RMSNorm scales are 1, every matrix random
        if name.startswith("blocks/"):
            plans[name] = lazy.layer_plan(
                name, shape, dtype,
                (lambda l, a, b, shape=shape: np.ones(shape[1:], dtype)) if name.endswith("scale")
                else (lambda l, a, b, shape=shape: random_bf16(rng, (b - a,) + shape[2:])))
        else:
            plans[name] = lazy.rows_plan(
                name, shape, dtype,
                (lambda rows, shape=shape: np.ones(shape, dtype)[rows]) if name.endswith("scale")
                else (lambda rows, shape=shape: random_bf16(
                    rng, (rows.stop - rows.start,) + tuple(shape[1:]))))
    lazy.write_params(path, plans, config, metadata={"bench": "random bfloat16 weights"})
    return config, sum(p.nbytes for p in plans.values())


def random_subset(config, keep: int, seed: int):
    routed = routed_experts(config)
    rng = np.random.default_rng(seed)
    layers = [sorted(rng.choice(routed, keep - config.moe.num_shared_experts,
                                replace=False).tolist()) for _ in range(config.model.num_layers)]
    return subset_lib.from_json({
        "format": subset_lib.FORMAT, "format_version": subset_lib.FORMAT_VERSION, "keep": keep,
        "shared_experts": config.moe.num_shared_experts, "layers": layers, "method": "random",
        "data": {"seed": seed},
        "model": {"shape": subset_lib.model_shape(config), "router_digest": None}})


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return e


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/emo_bench_lazy")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    per_layer = 3 * 128 * 2048 * 1024 * 2 + 4 * 2048 * 2048 * 2
    need = args.layers * per_layer * 1.45 + 2 * 100_352 * 2048 * 2  # + outputs of 12.5%, 25%
    if need > 0.9 * free:
        raise SystemExit(f"{args.workdir}: {free / 1e9:.0f} GB free, about {need / 1e9:.0f} GB "
                         f"needed; pass a smaller --layers")
    full = os.path.join(args.workdir, "full")
    shutil.rmtree(full, ignore_errors=True)
    start = time.perf_counter()
    config, array_bytes = write_checkpoint(full, args.layers)
    write_seconds = time.perf_counter() - start
    on_disk = dir_bytes(full)
    print(f"wrote {full}: {array_bytes / 1e9:.2f} GB of bfloat16 arrays ({on_disk / 1e9:.2f} GB "
          f"on disk) in {write_seconds:.0f} s")

    base = subprocess.run([sys.executable, "-c", BASELINE], cwd=REPO, env=env(), text=True,
                          capture_output=True, check=True)
    baseline = json.loads(base.stdout.strip().splitlines()[-1])["peak"]
    rows = []
    try:
        for keep in (16, 32):
            subset_path = os.path.join(args.workdir, f"subset_{keep}.json")
            subset_lib.save(random_subset(config, keep, keep), subset_path)
            out = os.path.join(args.workdir, f"extract_{keep}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "emo_jax.extract", f"--checkpoint={full}",
                 f"--subset={subset_path}", f"--out={out}"],
                cwd=REPO, env=env(), text=True, capture_output=True)
            seconds = time.perf_counter() - t0
            if proc.returncode:
                raise SystemExit(proc.stderr)
            print(proc.stdout)
            peak = int(re.search(r"peak memory \(RSS\) of this process: ([\d,]+)",
                                 proc.stdout).group(1).replace(",", ""))
            with open(os.path.join(out, "metadata.json"), encoding="utf-8") as f:
                report = json.load(f)["extract"]
            rows.append({
                "keep": f"{keep}/128 ({(keep) / 128:.1%})",
                "checkpoint_GB": round(array_bytes / 1e9, 2),
                "output_GB": round(report["bytes_after"] / 1e9, 3),
                "read_GB": round(report["bytes_read"] / 1e9, 3),
                "peak_rss_GB": round(peak / 1e9, 3),
                "baseline_rss_GB": round(baseline / 1e9, 3),
                "peak_minus_baseline_GB": round((peak - baseline) / 1e9, 3),
                "peak_over_checkpoint": round(peak / array_bytes, 4),
                "seconds": round(seconds, 1),
            })
            if not args.keep:
                shutil.rmtree(out)
                os.remove(subset_path)
    finally:
        if not args.keep:
            shutil.rmtree(full, ignore_errors=True)
    m = config.model
    write_results("lazy_extract", rows, extra={
        "command": "python bench/bench_lazy_extract.py" + (
            f" --layers={args.layers}" if args.layers != 16 else ""),
        "shape": {"num_layers": m.num_layers, "d_model": m.d_model,
                  "num_experts": config.moe.num_experts,
                  "num_shared_experts": config.moe.num_shared_experts,
                  "expert_hidden": config.moe.expert_hidden, "vocab_size": m.vocab_size,
                  "dtype": "bfloat16"},
        "checkpoint_array_bytes": array_bytes, "checkpoint_disk_bytes": on_disk,
        "write_seconds": round(write_seconds, 1)})


if __name__ == "__main__":
    main()
