"""The device mesh and the platform the model is traced for, as the model sees them.

Training and evaluation trace the model under `jax.set_mesh(mesh)`; the few places whose math
must run per device (routing, expert dispatch, Pallas kernels that XLA cannot partition) ask
`ambient_mesh` whether to wrap themselves in `jax.shard_map` over the batch axes. The axis names
equal `emo_jax.parallel`'s (the model cannot import it: it sits above the model).

`platform()` is the backend the model's 'auto' choices (grouped matmul, attention, expert
dispatch) and kernel checks are made for: `jax.default_backend()`, unless a caller compiles
ahead of time for another one (`emo_jax.plan` for a TPU topology from a CPU host) and says so
with `compiling_for(platform)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import AxisType, PartitionSpec as P

EXPERT_AXIS = "expert"
BATCH_AXES = ("data", "fsdp", "expert")


def logical_spec(logical_axes, rules, taken=()) -> P:
    """The PartitionSpec of a parameter from its logical axis names and `mesh.rules` (logical
    name -> comma-joined mesh axes, '' replicated).

    A mesh axis splits at most one axis of a parameter: the first, in the parameter's layout,
    whose rule names it (and none in `taken`). With 'embed' and 'expert_mlp' both on 'fsdp', an
    expert's gate and up projections ([E, D, F]) are split along d_model and its down projection
    ([E, F, D]) along its hidden axis, so no expert weight is split along its last (minor) axis.
    """
    used, parts = set(taken), []
    for name in logical_axes:
        target = rules.get(name, "") if name is not None else ""
        axes = tuple(a for a in str(target).split(",") if a and a not in used)
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*parts)


_TARGET_PLATFORM = contextvars.ContextVar("emo_jax_target_platform", default=None)


def platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the backend the model is traced for (module docstring)."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target: str):
    """Inside, `platform()` is `target`: tracing for ahead-of-time compilation elsewhere."""
    token = _TARGET_PLATFORM.set(target)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def ambient_mesh(rows: int):
    """The mesh set by `jax.set_mesh` at trace time when `rows` (a leading batch axis) should be
    split over it: it has the batch axes, none of them already manual, more than one device, and
    `rows` divides evenly (else, e.g. decoding one sequence, the one-device path runs under
    GSPMD: correct, not sharded). None otherwise.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == AxisType.Manual for a in BATCH_AXES):
        return None
    if rows % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return None
    return mesh


def pallas_allowed() -> bool:
    """Whether a Pallas (Mosaic) kernel may run here: XLA cannot partition one, so not under a
    multi-device mesh whose axes XLA still partitions (inside `shard_map` they are manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return True
    return all(t == AxisType.Manual for t in mesh.axis_types)
