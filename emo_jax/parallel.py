"""Device mesh, parameter and batch shardings, and multi-host glue.

The mesh has axes ('data', 'fsdp', 'expert') with sizes from `config.mesh` (-1 fills with the
devices left over), as an `AxisType.Auto` mesh (classic GSPMD propagation). Parameters carry
logical axis names (`logical_axes` metadata); `config.mesh.rules` maps each name to mesh axes, so
a layout change is a config edit. The batch is sharded over all three axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from emo_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES  # the batch rows are split over every mesh axis


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, expert) sizes for `num_devices`, with one -1 filled in."""
    sizes = [config.mesh[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one of mesh.data/fsdp/expert may be -1; got {tuple(sizes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh {tuple(sizes)} (data, fsdp, expert) cannot fill {num_devices} "
                              f"devices: {num_devices} is not divisible by {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {tuple(sizes)} (data, fsdp, expert) needs {math.prod(sizes)} "
                          f"devices but {num_devices} are available; set mesh.data=-1 to fill")
    return tuple(sizes)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'expert') Auto mesh for `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes, rules) -> P:
    """PartitionSpec for a parameter from its logical axis names and the config rules."""
    parts = []
    for name in logical_axes:
        target = rules.get(name, "") if name is not None else ""
        axes = tuple(a for a in str(target).split(",") if a)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*parts)


def variable_spec(variable: nnx.Variable, rules) -> P:
    """Spec of one NNX Variable; stacked layers add a leading 'layers' axis."""
    axes = variable.get_metadata().get("logical_axes")
    ndim = len(variable.get_value().shape)
    if axes is None:
        return P(*([None] * ndim))
    axes = tuple(axes)
    if ndim == len(axes) + 1:
        axes = ("layers",) + axes
    if ndim != len(axes):
        raise ValueError(f"parameter of shape {variable.get_value().shape} has logical axes {axes}")
    return logical_to_spec(axes, rules)


def state_shardings(state, mesh, config):
    """NamedSharding for every Variable of an NNX state (params and optimizer moments alike)."""
    rules = dict(config.mesh.rules)

    def one(variable):
        if isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, variable_spec(variable, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh) -> NamedSharding:
    """Rows over all mesh axes, positions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh) -> int:
    """How many devices the batch rows are split over."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(config, mesh):
    """Clear error when the global (micro-)batch cannot be split over the batch axes."""
    rows = config.data.batch_size // config.train.micro_batches
    shards = batch_shards(mesh)
    if rows % shards:
        raise ConfigError(
            f"data.batch_size / train.micro_batches = {rows} rows cannot be split over the "
            f"{shards} devices of the batch axes {BATCH_AXES} (mesh {dict(mesh.shape)}); use a "
            f"multiple of {shards}")


def host_to_global(host_batch: dict, mesh) -> dict:
    """Global jax.Arrays from this host's rows (every host passes its own slice)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host_batch.items()}
