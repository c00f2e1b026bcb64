"""The model on device meshes against one device: losses, aux losses, gradients, parameter
layouts, the global vs. local balance reduction, the compiled program's collectives, and the
mesh / batch / expert checks of `emo_jax.parallel`."""

import functools
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from emo_jax import parallel
from emo_jax.config import ConfigError, validate
from emo_jax.model import losses
from emo_jax.model.transformer import Transformer
from emo_jax.model.model_config import ModelConfig
from emo_jax.train.loss import loss_and_metrics

sys.path.insert(0, str(Path(__file__).parent))
from multihost_worker import global_batch, tiny_config  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 1, 4), (2, 2, 2)]
# Unoptimised machine code: these programs run once on tiny arrays, and LLVM's optimisation
# passes were half of the compile time (12.4 s -> 5.2 s CPU for the one-device train step).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
POOL_KEY = jax.random.key(7)
AUX = ("loss", "cross_entropy", "balance_loss", "router_z_loss", "output_z_loss",
       "mean_pool_size", "predicted_tokens")


def no_drop_config(mesh_shape, **moe):
    config = tiny_config(mesh_shape)
    # capacity_factor = E / K gives C = T_local slots per expert: nothing can drop.
    config.moe.update(capacity_factor=config.moe.num_experts / config.moe.top_k, **moe)
    return config


def batch_np():
    c = tiny_config((1, 1, 1))
    return global_batch(0, c.data.batch_size, c.data.seq_len, c.model.vocab_size)


def loss_grad_fn(graphdef, config, num_shards=1):
    def f(state, batch):
        model = nnx.merge(graphdef, state)
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: loss_and_metrics(m, batch, config, POOL_KEY, num_shards=num_shards),
            has_aux=True)(model)
        return loss, metrics, grads
    return f


@functools.cache
def initial_model():
    """(graphdef, host state) of the tiny model; one jitted init (eagerly: 4x the CPU time)."""
    config = no_drop_config((1, 1, 1))
    model_config = ModelConfig.from_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.state(Transformer(model_config, rngs=nnx.Rngs(0))),
                    compiler_options=FAST_COMPILE)()
    return graphdef, jax.device_get(state)


@pytest.fixture(scope="module")
def single_device():
    config = no_drop_config((1, 1, 1))
    graphdef, state = initial_model()
    device = jax.devices()[0]
    state, batch = jax.device_put((state, batch_np()), device)
    loss, metrics, grads = jax.jit(loss_grad_fn(graphdef, config),
                                   compiler_options=FAST_COMPILE)(state, batch)
    return jax.device_get((loss, metrics, grads))


_COMPILED = {}


def on_mesh(mesh_shape):
    """(loss, metrics, grads, placed state, mesh, compiled train step) of the tiny model on a
    mesh; compiled once per mesh for the whole module (compiling dominates the test time)."""
    if mesh_shape not in _COMPILED:
        _COMPILED[mesh_shape] = _train_step_on_mesh(mesh_shape)
    return _COMPILED[mesh_shape]


def _train_step_on_mesh(mesh_shape):
    config = no_drop_config(mesh_shape)
    mesh = parallel.make_mesh(config)
    parallel.check_experts(config, mesh)
    parallel.check_batch(config, mesh)
    graphdef, state = initial_model()
    shardings = parallel.state_shardings(state, mesh, config)
    loss_grad = loss_grad_fn(graphdef, config, parallel.batch_shards(mesh))
    tx = optax.adamw(1e-3)

    def train_step(state, opt_state, batch):  # loss, gradients and the AdamW update
        loss, metrics, grads = loss_grad(state, batch)
        updates, opt_state = tx.update(grads, opt_state, state)
        return loss, metrics, grads, optax.apply_updates(state, updates), opt_state

    with jax.set_mesh(mesh):
        state = jax.device_put(state, shardings)
        opt_state = jax.jit(tx.init)(state)
        batch = parallel.host_to_global(batch_np(), mesh)
        compiled = jax.jit(train_step, donate_argnums=1, compiler_options=FAST_COMPILE).lower(
            state, opt_state, batch).compile()
        loss, metrics, grads, _, _ = compiled(state, opt_state, batch)
    return loss, metrics, grads, state, mesh, compiled


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(mesh_shape, single_device):
    ref_loss, ref_metrics, ref_grads = single_device
    loss, metrics, grads, state, mesh, _ = on_mesh(mesh_shape)

    assert float(metrics["dropped_tokens"]) == 0.0
    for name in AUX:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=2e-6, atol=1e-6,
                                   err_msg=name)
    for name in ("counts_LR", "tokens_L", "max_load_ratio_L", "unused_experts_L"):
        np.testing.assert_array_equal(metrics[name], ref_metrics[name], err_msg=name)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert len(flat) == len(ref_flat)
    for path, g in flat:
        ref = ref_flat[path]
        scale = float(np.abs(ref[...]).max())
        assert scale > 0, path  # every parameter gets a gradient
        np.testing.assert_allclose(np.asarray(g[...]), ref[...], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=str(path))

    # Parameters really are laid out as the rules say (default: experts on 'expert', the
    # d_model axis on 'fsdp', but the hidden axis for down projections, whose minor axis is
    # d_model): check the spec and the shape of what each device holds.
    data, fsdp, expert = mesh_shape
    blocks = dict(nnx.to_flat_state(state))
    w_gate = blocks[("blocks", "moe", "w_gate")][...]  # [L, E, D, F]
    assert w_gate.sharding.spec == P(None, "expert", "fsdp", None)
    assert w_gate.addressable_shards[0].data.shape == (2, 8 // expert, 32 // fsdp, 48)
    w_down = blocks[("blocks", "moe", "w_down")][...]  # [L, E, F, D]
    assert w_down.sharding.spec == P(None, "expert", "fsdp", None)
    assert w_down.addressable_shards[0].data.shape == (2, 8 // expert, 48 // fsdp, 32)
    wq = blocks[("blocks", "attn", "wq")][...]  # [L, D, H, Dh]
    assert wq.addressable_shards[0].data.shape == (2, 32 // fsdp, 2, 16)
    embed = blocks[("embed",)][...]
    assert embed.addressable_shards[0].data.shape == (64, 32 // fsdp)
    router = blocks[("blocks", "moe", "router")][...]
    assert router.addressable_shards[0].data.shape == (2, 32 // fsdp, 8)


def test_global_balance_is_the_single_device_loss_and_local_differs(single_device):
    """8 devices, scope 'global': the global-batch loss. Scope 'local' (the ablation): one loss
    per device from that device's rows alone, checked against the device shards themselves."""
    _, ref_metrics, _ = single_device
    _, metrics, _, state, mesh, _ = on_mesh((2, 2, 2))
    np.testing.assert_allclose(metrics["balance_loss"], ref_metrics["balance_loss"], rtol=2e-6)

    config = no_drop_config((2, 2, 2))
    graphdef, _ = initial_model()

    def stats_and_local(state, batch):
        stats = nnx.merge(graphdef, state)(batch["tokens"], batch["segment_ids"],
                                           batch["positions"], pool_key=POOL_KEY).routing
        local = losses.balance_loss_per_layer(stats.counts_BR, stats.prob_sums_BR,
                                              stats.tokens_B, config.moe.top_k, "local",
                                              num_shards=parallel.batch_shards(mesh))
        return stats, local

    with jax.set_mesh(mesh):
        batch = parallel.host_to_global(batch_np(), mesh)
        stats, local_L = jax.jit(stats_and_local, compiler_options=FAST_COMPILE)(state, batch)

    # Independent: each device's loss from the statistics rows that device holds.
    per_device = []
    for c_shard, p_shard, t_shard in zip(*(getattr(stats, k).addressable_shards
                                           for k in ("counts_BR", "prob_sums_BR", "tokens_B"))):
        counts, probs = np.asarray(c_shard.data, np.float64), np.asarray(p_shard.data, np.float64)
        tokens = np.asarray(t_shard.data, np.float64).sum(1)  # [L]
        f = counts.sum(1) / (config.moe.top_k * tokens[:, None])
        per_device.append(8 * np.sum(f * probs.sum(1) / tokens[:, None], -1))
    assert len(per_device) == 8
    np.testing.assert_allclose(local_L, np.mean(per_device, 0), rtol=1e-5)
    # The local scope is a different number (the test would pass vacuously otherwise).
    assert abs(float(np.mean(local_L)) - float(ref_metrics["balance_loss"])) > 1e-2


def test_rows_are_contiguous_per_device():
    """The 'local' scope reshapes rows into contiguous blocks, one per device: true of the batch
    sharding on every mesh (device d of the flattened mesh holds block d)."""
    for shape in MESHES:
        mesh = parallel.make_mesh(tiny_config(shape))
        rows = jax.device_put(np.arange(16), parallel.batch_sharding(mesh))
        flat_devices = list(mesh.devices.reshape(-1))
        assert len(rows.addressable_shards) == 8
        for shard in rows.addressable_shards:
            block = flat_devices.index(shard.device)
            np.testing.assert_array_equal(shard.data, np.arange(2 * block, 2 * block + 2))


def collectives(hlo_text):
    """(kind, result shapes, replica groups) of every collective in compiled HLO text; groups
    as sorted tuples of positions in the program's device list, whichever way XLA prints them
    (explicit lists, iota '[4,2]<=[8]', or mesh axes "mesh['a'=2,'b'=4] {'b'}")."""
    out = []
    pattern = re.compile(r"= (\(.*?\)|\S+) (all-to-all|all-gather|all-reduce|reduce-scatter|"
                         r"collective-permute)(?:-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d)
                      for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
            out.append((m.group(2), shapes, replica_groups(line)))
    return out


def replica_groups(line):
    if m := re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line):
        groups = [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}",
                                                                          m.group(1))]
    elif m := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        shape, dims = [[int(i) for i in g.split(",")] for g in m.groups()[:2]]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(i) for i in m.group(3).split(",")])
        groups = ids.reshape(shape).tolist()
    elif m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in grouped]
        groups = ids.transpose(rest + grouped).reshape(-1, math.prod(
            sizes[i] for i in grouped)).tolist()
    else:
        return None
    return tuple(sorted(tuple(sorted(g)) for g in groups))


def test_compiled_train_step_uses_all_to_all_and_never_gathers_all_experts():
    *_, mesh, compiled = on_mesh((2, 2, 2))
    ops = collectives(compiled.as_text())
    # Positions in the mesh's device list that differ only in their 'expert' coordinate.
    expert_groups = tuple(tuple(g) for g in np.arange(8).reshape(2, 2, 2).reshape(4, 2).tolist())
    a2a = [op for op in ops if op[0] == "all-to-all"]
    assert a2a and all(groups == expert_groups for _, _, groups in a2a), (expert_groups, a2a)
    # Dispatch and combine in the forward pass, their transposes in the backward pass.
    assert sum(1 for _, shapes, _ in a2a if math.prod(shapes[0]) > 8) >= 4

    full_experts = 8 * 32 * 48  # E x D x F of one layer's w_gate
    gathers = [op for op in ops if op[0] == "all-gather"]
    assert gathers  # the FSDP weight gathers are there, and are detected
    assert all(sum(math.prod(s) for s in shapes) < full_experts for _, shapes, _ in gathers), \
        gathers
    # The largest expert-weight gather is one device's experts, whole: E/EP x D x F.
    assert max(sum(math.prod(s) for s in shapes) for _, shapes, _ in gathers) == 4 * 32 * 48


def test_gather_detector_sees_a_full_expert_gather():
    """The check above can fail: a program that does gather all experts is caught."""
    config = tiny_config((2, 2, 2))
    mesh = parallel.make_mesh(config)
    w = jax.device_put(jnp.ones((8, 32, 48)),
                       jax.sharding.NamedSharding(mesh, P("expert", "fsdp", None)))
    text = jax.jit(lambda w: w * w.sum(0, keepdims=True)[::-1] + w[::-1],
                   out_shardings=jax.sharding.NamedSharding(mesh, P())).lower(w).compile()
    sizes = [sum(math.prod(s) for s in shapes) for kind, shapes, _ in
             collectives(text.as_text()) if kind == "all-gather"]
    assert max(sizes) >= 8 * 32 * 48


# ---- mesh, batch and expert checks --------------------------------------------------------

def test_mesh_shape_fills_and_rejects():
    c = tiny_config((-1, 2, 2))
    assert parallel.mesh_shape(c, 8) == (2, 2, 2)
    mesh = parallel.make_mesh(c)
    assert mesh.axis_names == parallel.MESH_AXES and dict(mesh.shape) == {
        "data": 2, "fsdp": 2, "expert": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="needs 16 devices but 8"):
        parallel.mesh_shape(tiny_config((4, 2, 2)), 8)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        parallel.mesh_shape(tiny_config((-1, 3, 1)), 8)
    with pytest.raises(ConfigError, match="at most one"):
        parallel.mesh_shape(tiny_config((-1, -1, 1)), 8)


def test_expert_and_batch_checks():
    c = tiny_config((1, 1, 8))
    c.moe.update(num_experts=13, num_shared_experts=1)  # 12 routed experts
    with pytest.raises(ConfigError, match="12 routed experts cannot be split over the 'expert'"):
        parallel.check_experts(c, parallel.make_mesh(c))
    with pytest.raises(ConfigError, match=r"mesh.expert \(8\) must divide the routed experts"):
        validate(c)
    c.mesh.expert = 4
    validate(c)
    parallel.check_experts(c, parallel.make_mesh(tiny_config((2, 1, 4))))

    c = tiny_config((8, 1, 1))
    c.data.batch_size = 12
    with pytest.raises(ConfigError, match="12 rows cannot be split over the 8 devices"):
        parallel.check_batch(c, parallel.make_mesh(c))


def test_process_rows_single_process():
    mesh = parallel.make_mesh(tiny_config((2, 2, 2)))
    np.testing.assert_array_equal(parallel.process_rows(mesh, 16), np.arange(16))
    assert parallel.is_primary()


def test_initialize_distributed_without_a_cluster(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() == "single"
    assert parallel.initialize_distributed("127.0.0.1:1", 1, 0) == "single"
    with pytest.raises(ConfigError, match="give all of coordinator_address"):
        parallel.initialize_distributed("127.0.0.1:1")
    with pytest.raises(ConfigError, match="process_id 2 must be in"):
        parallel.initialize_distributed("127.0.0.1:1", 2, 2)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel._detected_cluster() is None  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel._detected_cluster() == "slurm"
