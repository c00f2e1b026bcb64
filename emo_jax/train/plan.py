"""Plan a run before launching it: compile the real train step ahead of time for the target
devices, without allocating any parameter, and read its memory per device.

The target is a Cloud TPU slice by name (compile-only devices from libtpu, so a CPU host can plan
a pod) or this host's devices. The step is the one training runs: `step.abstract_state` (shapes
and shardings only), `step.make_train_step(...).compile(...)` on the mesh `parallel.make_mesh`
builds from `mesh.*`, the batch sharded as `parallel.batch_sharding`.

Cloud TPU names (`TOPOLOGY_FORMS`): v4-N and v5p-N count TensorCores (2 per chip, so v5p-128 is
64 chips, 'v5p:4x4x4'); v5e-N (= v5litepod-N) and v6e-N count chips. An explicit libtpu shape
('v5p:2x2x4', 'v6e:4x8') is accepted too. v4 is planned in megacore mode (one device per chip),
as JAX runs it.

Memory figures are per device, from XLA's `memory_analysis()`: arguments (parameters, optimiser
state, batch), outputs (aliased with the donated arguments), temporaries; total = arguments +
outputs not aliased + temporaries. They are compared with the chip's HBM (`HBM_GIB`; the compile-
only device description does not expose it) or, for local devices, `memory_stats()['bytes_limit']`
(GPU, TPU) or the host RAM shared by the local devices (CPU). Model FLOPs per step come from the
model summary (XLA's cost_analysis counts one scan body and one micro-batch only).

While tracing for a TPU target the model is told so (`mesh_context.compiling_for`), so every
'auto' choice of the model (grouped matmul, attention, expert dispatch) is the one the pod will
make.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time

import jax
import ml_collections

from emo_jax import parallel
from emo_jax.config import ConfigError
from emo_jax.data.packing import opening_eos
from emo_jax.model import mesh_context
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.summary import summarize
from emo_jax.train import step as step_lib

GIB = 1024 ** 3

# HBM per chip (GiB) = per JAX device (v4 and v5p run as megacore: one device per chip).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# generation -> (TensorCores counted per chip in the Cloud name, torus dimensions, options)
_GENERATIONS = {
    "v4": (2, 3, {"chip_config_name": "megacore"}),
    "v5p": (2, 3, {}),
    "v5e": (1, 2, {}),
    "v6e": (1, 2, {}),
}
_ALIASES = {"v5litepod": "v5e"}
_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)

TOPOLOGY_FORMS = (
    "valid forms: v4-N or v5p-N (N = TensorCores, 2 per chip; N/2 chips a power of two >= 4, "
    "e.g. v5p-8, v5p-128), v5e-N / v5litepod-N or v6e-N (N = chips: 1, 4, 8, 16, 32, 64, 128, "
    "256), or an explicit shape GEN:AxBxC (v4, v5p) / GEN:AxB (v5e, v6e), e.g. v5p:2x2x4")

LIBTPU_MISSING = ("planning for a TPU topology needs libtpu, which is not installed: "
                  "pip install -e '.[tpu]'")


class PlanError(ValueError):
    """A bad --topology or a missing libtpu; one sentence."""


@dataclasses.dataclass
class Target:
    """The devices a plan compiles for."""
    name: str  # what the user asked for: 'v5p-128', or 'local'
    description: str  # e.g. 'v5p:4x4x4' or 'local cpu devices'
    kind: str  # one token: 'v5p', 'cpu', 'NVIDIA_H200'
    platform: str  # 'tpu', 'cpu', 'gpu'
    devices: list
    hbm_bytes: float | None  # per device; None: unknown
    hbm_source: str


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud's default slice shape: from 2x2x1 (1x1 in 2D) double the smallest (last) side."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def topology_name(name: str) -> tuple[str, str]:
    """(generation, libtpu topology name) for a Cloud TPU name or an explicit shape."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)+)", text)
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        sides = m.group(2).split("x")
        if len(sides) != _GENERATIONS[gen][1] or any(int(side) == 0 for side in sides):
            raise PlanError(f"unknown topology '{name}'; {TOPOLOGY_FORMS}")
        return gen, f"{gen}:{m.group(2)}"
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if not m:
        raise PlanError(f"unknown topology '{name}'; {TOPOLOGY_FORMS}")
    gen = _ALIASES.get(m.group(1), m.group(1))
    per_chip, dims, _ = _GENERATIONS[gen]
    n = int(m.group(2))
    chips = n // per_chip
    if dims == 3:
        ok = n % per_chip == 0 and chips >= 4 and chips & (chips - 1) == 0
    else:
        ok = chips in _CHIPS_2D
    if not ok:
        raise PlanError(f"unknown topology '{name}'; {TOPOLOGY_FORMS}")
    return gen, f"{gen}:{'x'.join(map(str, _torus_shape(chips, dims)))}"


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_target(name: str, hbm_gb: float | None = None) -> Target:
    """Compile-only devices of a TPU slice (needs libtpu; no TPU needed)."""
    gen, topo = topology_name(name)
    if not libtpu_available():
        raise PlanError(LIBTPU_MISSING)
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topo,
                                               **_GENERATIONS[gen][2]).devices
    except jax.errors.JaxRuntimeError as err:
        raise PlanError(f"libtpu could not describe topology {topo} ({name}): "
                        f"{str(err).splitlines()[0]}") from err
    hbm, source = HBM_GIB[gen] * GIB, f"{gen} HBM per chip"
    if hbm_gb is not None:
        hbm, source = hbm_gb * GIB, "--hbm_gb"
    return Target(name, f"{topo} ({devices[0].device_kind})", gen, "tpu", list(devices), hbm,
                  source)


def local_target(hbm_gb: float | None = None) -> Target:
    """This process's devices; memory from memory_stats(), or the host RAM they share (CPU)."""
    devices = jax.devices()
    dev = devices[0]
    kind = re.sub(r"\s+", "_", dev.device_kind.strip()) or dev.platform
    hbm, source = None, "unknown"
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        stats = {}
    if stats.get("bytes_limit"):
        hbm, source = float(stats["bytes_limit"]), "memory_stats bytes_limit"
    elif dev.platform == "cpu":
        try:
            import psutil

            local = max(1, jax.local_device_count())
            hbm = psutil.virtual_memory().total / local
            source = f"host RAM / {local} local devices"
        except ImportError:
            pass
    if hbm_gb is not None:
        hbm, source = hbm_gb * GIB, "--hbm_gb"
    return Target("local", f"local {dev.platform} devices", kind, dev.platform, devices, hbm,
                  source)


_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z][a-z0-9]*)\[([0-9,]*)\]\S*\s+"
                    r"([a-z][\w\-]*)\(")
_NO_ALLOC = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all"}


def largest_buffers(hlo_text: str, count: int = 5, limit: float | None = None) -> list[dict]:
    """The largest array values of the optimised (per-device) HLO outside fusion bodies: a
    rough view of what fills the temporaries (best effort; parameters excluded). Values over
    `limit` bytes (e.g. the temporaries' total) are never allocated whole and are left out."""
    found, skip = [], False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split("(", 1)[0]
            skip = "fused" in header or "wrapped" in header or "region" in header
            continue
        if skip:
            continue
        m = _INSTR.match(line)
        if not m or m.group(4) in _NO_ALLOC or m.group(2) not in _DTYPE_BYTES:
            continue
        dims = [int(d) for d in m.group(3).split(",") if d]
        size = math.prod(dims) * _DTYPE_BYTES[m.group(2)]
        if limit is not None and size > limit:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        where = "/".join(op_name.group(1).split("/")[-3:]) if op_name else ""
        found.append({"bytes": size, "shape": f"{m.group(2)}[{m.group(3)}]", "op": m.group(4),
                      "name": m.group(1), "source": where})
    found.sort(key=lambda b: -b["bytes"])
    return found[:count]


def make_plan(config, target: Target) -> dict:
    """Compiles the train step for `target` and returns the figures of the plan."""
    notes = []
    if config.data.boundary == "eos_opens":
        try:
            opening_eos(config)
        except ConfigError:
            # The eos id is a value in the targets, never a shape: the same program's memory.
            config = ml_collections.ConfigDict(config.to_dict())
            config.data.boundary = "eos_closes"
            notes.append(f"note: data.tokenizer ({config.data.tokenizer!r}) is not readable "
                         f"here; planned with data.boundary='eos_closes' (same shapes and "
                         f"memory as 'eos_opens')")
    mesh = parallel.make_mesh(config, devices=target.devices)
    parallel.check_batch(config, mesh)
    parallel.check_experts(config, mesh)
    summary = summarize(ModelConfig.from_config(config), config.data.seq_len)
    with mesh_context.compiling_for(target.platform):
        graphdef, abstract, shardings = step_lib.abstract_state(config, mesh)
        start = time.perf_counter()
        compiled = step_lib.make_train_step(config, graphdef, shardings, mesh).compile(abstract)
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    output, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
    total = args + max(output - alias, 0) + temp
    fits = target.hbm_bytes is None or total <= target.hbm_bytes
    tokens = config.data.batch_size * config.data.seq_len
    plan = {
        "target": target, "mesh": dict(mesh.shape), "devices": len(target.devices),
        "args": args, "output": output, "alias": alias, "temp": temp, "total": total,
        "peak": getattr(mem, "peak_memory_in_bytes", 0) or None,
        "fits": fits, "compile_s": compile_s, "summary": summary,
        "flops_per_step": summary["flops_per_token"] * tokens, "tokens_per_step": tokens,
        "largest": [], "notes": notes,
    }
    if not fits:
        try:
            plan["largest"] = largest_buffers(compiled.as_text(), limit=max(temp, 1))
        except Exception:  # noqa: BLE001 - best effort; the plan stands without it
            plan["largest"] = []
    return plan


def _gib(value) -> str:
    return f"{value / GIB:.3f}"


def report_lines(plan: dict) -> list[str]:
    """The human-readable plan; the last line is the machine-readable `plan: ...` summary."""
    t, s = plan["target"], plan["summary"]
    hbm = t.hbm_bytes
    lines = list(plan.get("notes", [])) + [
        f"target: {t.name} = {t.description}, {plan['devices']} devices",
        "mesh: " + " ".join(f"{k}={v}" for k, v in plan["mesh"].items()),
        f"model: {s['total_params']:,} parameters ({s['active_params']:,} active); "
        f"{plan['flops_per_step']:.4g} model FLOPs per step ({plan['tokens_per_step']:,} tokens x "
        f"{s['flops_per_token']:,} per token), {plan['flops_per_step'] / plan['devices']:.4g} per "
        f"device",
        f"memory per device (GiB): arguments {_gib(plan['args'])}, outputs "
        f"{_gib(plan['output'])} (aliased to arguments {_gib(plan['alias'])}), temporaries "
        f"{_gib(plan['temp'])}, total {_gib(plan['total'])}"
        + (f" of {_gib(hbm)} ({100 * plan['total'] / hbm:.0f}%; {t.hbm_source})" if hbm
           else " of unknown device memory"),
        f"compile: {plan['compile_s']:.1f} s",
    ]
    if plan["largest"]:
        lines.append("largest buffers per device (best effort, from the optimised HLO):")
        lines += [f"  {b['bytes'] / 2 ** 20:.1f} MiB {b['shape']} {b['op']} "
                  f"{b['source'] or b['name']}" for b in plan["largest"]]
    lines.append(
        f"plan: fits={'yes' if plan['fits'] else 'no'} devices={plan['devices']} kind={t.kind} "
        f"hbm_gb={_gib(hbm) if hbm else 'unknown'} args_gb={_gib(plan['args'])} "
        f"temp_gb={_gib(plan['temp'])} total_gb={_gib(plan['total'])} "
        f"compile_s={plan['compile_s']:.1f}")
    return lines

