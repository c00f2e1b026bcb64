"""Shared helpers of the benchmarks: timing compiled functions and writing result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

OUT_DIR = Path(__file__).resolve().parent / "out"


def time_compiled(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall seconds of fn(*args) (already jitted), blocking on the result."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    """What the numbers were measured on."""
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__, "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Prints rows as a table and writes {machine, rows} as JSON under bench/out/."""
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        widths = [max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for r in rows:
            print("  ".join(_fmt(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows, **(extra or {})}, indent=1))
    print(f"wrote {path}")
    return path


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
