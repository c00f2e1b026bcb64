"""Device mesh, parameter and batch shardings, and multi-host glue.

The mesh has axes ('data', 'fsdp', 'expert') with sizes from `config.mesh` (-1 fills with the
devices left over), as an `AxisType.Auto` mesh (classic GSPMD propagation). Parameters carry
logical axis names (`logical_axes` metadata); `config.mesh.rules` maps each name to mesh axes, so
a layout change is a config edit. The batch is sharded over all three axes.

The model finds the mesh through `jax.set_mesh(mesh)`: trace (jit) the train and eval steps
inside it, and the MoE layers run their routing and experts per device (expert parallelism over
'expert', see `emo_jax/model/moe_parallel.py`); without it they run as on one device.

Multi-host: call `initialize_distributed()` first thing in every process (before any other JAX
call); each process then feeds the rows `process_rows(mesh, global_rows)` of every global batch
through `host_to_global`, and only `is_primary()` writes logs.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from emo_jax.config import ConfigError, routed_experts
from emo_jax.model.mesh_context import logical_spec

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


def check_experts(config, mesh):
    """Clear error when the routed experts cannot be split over the mesh's 'expert' axis."""
    routed = routed_experts(config)
    ep = mesh.shape["expert"]
    if routed % ep:
        raise ConfigError(
            f"moe.num_experts - moe.num_shared_experts = {routed} routed experts cannot be split "
            f"over the 'expert' mesh axis of size {ep} (mesh.expert); use a divisor of {routed}")


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
    return logical_spec(axes, rules)


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


def process_rows(mesh, global_rows: int) -> np.ndarray:
    """Indices of the global batch rows this process must feed to `host_to_global`, in order.

    With `jax.make_mesh` over all devices they are one contiguous block per process: the block
    `host_rows(global_rows)`.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    rows = {i for index in index_map.values() for i in range(*index[0].indices(global_rows))}
    return np.asarray(sorted(rows), np.int64)


def host_rows(global_rows: int, process_index: int | None = None,
              process_count: int | None = None) -> slice:
    """Rows [p * B/P, (p+1) * B/P) of a global batch of B rows: what process p of P feeds.

    One contiguous block per process, in process order (defaults: this process, of all of
    them); the rows `process_rows` gives for a mesh made from jax.devices() in their order (the
    training loop checks its mesh's rows are one such block). B must be divisible by P.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per_process = global_rows // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def is_primary() -> bool:
    """True in the one process that writes logs, metrics and console output (process 0)."""
    return jax.process_index() == 0


def use_distributed_barriers():
    """Orbax's default barrier is a device collective (sync_global_devices). Run from its
    background save thread, it can interleave with the training step's collectives in a
    different order on different hosts: seen here as a hang of two CPU processes (gloo). The
    JAX distributed client's barrier involves no device."""
    name = "experimental_orbax_use_distributed_barrier"
    if jax.process_count() > 1 and name in flags.FLAGS:
        flags.FLAGS[name].value = True


def barrier(name: str):
    """A barrier of all processes (through the distributed client, no device involved)."""
    if jax.process_count() > 1:
        use_distributed_barriers()
        ocp.multihost.sync_global_processes(name)


# Variables by which launchers announce a multi-process job (jax reads them itself when
# jax.distributed.initialize() is called without arguments).
_CLUSTER_ENV = {
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"),
    "tpu": ("TPU_WORKER_HOSTNAMES",),  # Cloud TPU pod slices (GKE, queued resources)
    "env": ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),  # any launcher
}


def _detected_cluster() -> str | None:
    """The launcher that started this process as one of several, or None for a lone process."""
    env = os.environ
    if all(k in env for k in _CLUSTER_ENV["slurm"]) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if all(env.get(k) for k in _CLUSTER_ENV["env"]):
        return "env"
    return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids=None) -> str:
    """Joins this process to a multi-process JAX job; call it before any other JAX call.

    With `coordinator_address` ('host:port' of process 0), `num_processes` and `process_id`, the
    job is set up from those (explicit flags: a CPU cluster, a test on 127.0.0.1). Without them,
    from the environment when a launcher announced several processes (SLURM `srun`, a Cloud TPU
    pod slice, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID set by any
    launcher); otherwise this is a single-process run and nothing happens. CPU devices of
    several processes talk through gloo collectives.

    Returns how the job was set up: 'explicit', 'slurm', 'tpu', 'env' or 'single'.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError(
                "multi-process flags: give all of coordinator_address (host:port of process 0), "
                f"num_processes and process_id; got {explicit}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id {process_id} must be in [0, num_processes = "
                              f"{num_processes})")
        if num_processes == 1:
            return "single"
        how = "explicit"
    else:
        how = _detected_cluster()
        if how is None:
            return "single"
        if how == "env":
            coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
            num_processes = int(os.environ["JAX_NUM_PROCESSES"])
            process_id = int(os.environ["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return how
    # Without it XLA:CPU has no cross-process collectives; it does not affect GPU or TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if how in ("explicit", "env"):
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids)
    else:
        jax.distributed.initialize(local_device_ids=local_device_ids)
    return how
