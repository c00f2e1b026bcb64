"""Expert-parallel dispatch (emo_jax/model/moe_parallel.py) against independent references:
the capacity dispatch's drops against a NumPy count in slot order, its kept outputs and
gradients against a dense reference, and the dropless ragged dispatch (with an all_gather-built
ragged_all_to_all on CPU; the real collective on GPU/TPU) against the one-device path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax import parallel
from emo_jax.config import default_config
from emo_jax.model import experts
from emo_jax.model import moe as moe_lib
from emo_jax.model.model_config import ModelConfig
from emo_jax.model import moe_parallel, routing

E, K, D, F = 8, 2, 16, 24
T_LOCAL = 16  # tokens per device
RULES = dict(default_config().mesh.rules)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tiny programs run once; see test_parallel
ON_ACCELERATOR = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def mesh_of(shape):
    c = default_config()
    c.mesh.update(data=shape[0], fsdp=shape[1], expert=shape[2])
    return parallel.make_mesh(c, jax.devices()[:int(np.prod(shape))])


def skewed_routing(rng, tokens):
    """Distinct top-k experts per token drawn with a skew (expert 0 most popular), positive
    weights, and dead assignments: some padding tokens (all weights 0) and some single ones."""
    p = np.exp(-0.4 * np.arange(E))
    idx = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(tokens)])
    w = rng.uniform(0.1, 1.0, (tokens, K)).astype(np.float32)
    w[rng.random(tokens) < 0.1] = 0.0
    w[rng.random(tokens) < 0.1, 1] = 0.0
    return idx.astype(np.int32), w


def weights(rng):
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    return [(0.2 * rng.normal(size=s)).astype(np.float32) for s in shapes]


def swiglu_np(x, wg, wu, wd):
    h = x @ wg
    return (h / (1 + np.exp(-h)) * (x @ wu)) @ wd


def sharded_call(mesh, x, idx, w, ws, specs, **kwargs):
    """moe_parallel.routed_experts on `mesh`, inputs placed as a train step has them."""
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    args = [jax.device_put(a, rows) for a in (x, idx, w)]
    args += [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(ws, specs)]
    options = dict(dispatch="capacity", capacity_factor=2.0, impl="ragged_dot", block_size=4,
                   compute_dtype="float32")
    options.update(kwargs)

    def f(*args):
        return moe_parallel.routed_experts(*args, mesh=mesh, weight_specs=specs, **options)

    with jax.set_mesh(mesh):
        return jax.jit(f, compiler_options=FAST_COMPILE)(*args)


def numpy_capacity_keep(idx, w, devices, cap):
    """Which assignments fit: per device (a contiguous block of rows) and expert, the first
    `cap` live assignments in (token, k) order. Returns (keep mask, dropped count)."""
    keep = np.zeros(w.shape, bool)
    dropped = 0
    per = len(idx) // devices
    for d in range(devices):
        taken = np.zeros(E, int)
        for t in range(d * per, (d + 1) * per):
            for k in range(K):
                if w[t, k] > 0:
                    e = idx[t, k]
                    if taken[e] < cap:
                        keep[t, k] = True
                    else:
                        dropped += 1
                    taken[e] += 1
    return keep, dropped


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 1, 8)], ids=["2x1x4", "1x1x8"])
def test_capacity_dispatch_drops_exactly_and_keeps_the_rest(mesh_shape):
    rng = np.random.default_rng(0)
    devices = 8
    x = rng.normal(size=(devices * T_LOCAL, D)).astype(np.float32)
    idx, w = skewed_routing(rng, devices * T_LOCAL)
    ws = weights(rng)
    factor = 1.0
    cap = moe_parallel.capacity(T_LOCAL, K, E, factor)
    assert cap == 4  # = 1.0 x 16 tokens x 2 / 8 experts
    keep, dropped = numpy_capacity_keep(idx, w, devices, cap)
    assert 10 < dropped < keep.sum()  # the skew makes the popular experts overflow

    mesh = mesh_of(mesh_shape)
    specs = (P("expert"),) * 3
    y, rows, got_dropped = sharded_call(mesh, x, idx, w, ws, specs, capacity_factor=factor)
    assert int(got_dropped) == dropped
    assert int(rows) == keep.sum()  # the experts ran on kept rows only, not on empty slots

    expert_out = np.stack([swiglu_np(x.astype(np.float64), *(a[e] for a in ws))
                           for e in range(E)], 1)  # [T, E, D]
    gathered = np.take_along_axis(expert_out, idx[..., None], 1)  # [T, K, D]
    ref = np.einsum("tkd,tk->td", gathered, w * keep)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    # Gradients through both all_to_alls equal those of a dense reference with the same drops.
    cos = jnp.cos(jnp.arange(D, dtype=jnp.float32))

    def dense(x, w, wg, wu, wd):
        h = jnp.einsum("td,tkdf->tkf", x, wg[idx])
        out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(h) * jnp.einsum("td,tkdf->tkf", x, wu[idx]),
                         wd[idx])
        return jnp.sum(jnp.einsum("tkd,tk->td", out, w * keep) * cos)

    def sharded(x, w, wg, wu, wd):
        y, _, _ = moe_parallel.routed_experts(
            x, jnp.asarray(idx), w, wg, wu, wd, mesh=mesh, weight_specs=specs,
            dispatch="capacity", capacity_factor=factor, impl="ragged_dot", block_size=4,
            compute_dtype="float32")
        return jnp.sum(y * cos)

    g_ref = jax.grad(dense, argnums=range(5))(x, w, *ws)
    with jax.set_mesh(mesh):
        g = jax.jit(jax.grad(sharded, argnums=range(5)), compiler_options=FAST_COMPILE)(
            x, w, *ws)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def reference_ragged_all_to_all(monkeypatch):
    """On CPU the ragged dispatch runs with the all_gather-built collective."""
    if not ON_ACCELERATOR:
        monkeypatch.setattr(moe_parallel, "_ragged_all_to_all",
                            moe_parallel.ragged_all_to_all_reference)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (1, 1, 8)], ids=["1x2x4", "1x1x8"])
def test_ragged_dispatch_is_dropless_and_matches_one_device(mesh_shape,
                                                            reference_ragged_all_to_all):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8 * T_LOCAL, D)).astype(np.float32)
    idx, w = skewed_routing(rng, 8 * T_LOCAL)
    ws = weights(rng)
    mesh = mesh_of(mesh_shape)
    # The default rules: gate/up split along d_model, down along the hidden axis, over 'fsdp'
    # (never the minor axis); gathered within each expert shard.
    specs = tuple(moe_parallel.weight_spec(axes, RULES) for axes in (
        ("expert", "embed", "expert_mlp"),) * 2 + (("expert", "expert_mlp", "embed"),))
    assert specs[0] == P("expert", "fsdp", None) and specs[2] == P("expert", "fsdp", None)

    y, rows, dropped = sharded_call(mesh, x, idx, w, ws, specs, dispatch="ragged")
    y_ref, rows_ref = experts.dispatch_local(x, idx, w, *ws, impl="ragged_dot", block_size=4,
                                             compute_dtype="float32")
    assert int(dropped) == 0 and int(rows) == int(rows_ref) == int((w > 0).sum())
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    cos = jnp.cos(jnp.arange(D, dtype=jnp.float32))

    def loss(x, w, wg, wu, wd, sharded):
        if sharded:
            y, _, _ = moe_parallel.routed_experts(
                x, jnp.asarray(idx), w, wg, wu, wd, mesh=mesh, weight_specs=specs,
                dispatch="ragged", capacity_factor=1.0, impl="ragged_dot", block_size=4,
                compute_dtype="float32")
        else:
            y, _ = experts.dispatch_local(x, jnp.asarray(idx), w, wg, wu, wd, impl="ragged_dot",
                                          block_size=4, compute_dtype="float32")
        return jnp.sum(y * cos)

    g_ref = jax.grad(loss, argnums=range(5))(x, w, *ws, False)
    with jax.set_mesh(mesh):
        g = jax.jit(jax.grad(loss, argnums=range(5)), static_argnums=5,
                    compiler_options=FAST_COMPILE)(x, w, *ws, True)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ragged_all_to_all_reference_follows_the_documented_contract():
    """The example of jax.lax.ragged_all_to_all's docstring, on an axis of size 2."""
    mesh = jax.make_mesh((2,), ("expert",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
    args = [jnp.array(a, jnp.int32) for a in (
        [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])]

    def f(operand, *args):
        out = moe_parallel.ragged_all_to_all_reference(
            operand[0], jnp.zeros(4, jnp.float32), *(a[0] for a in args), axis_name="expert")
        return out[None]

    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))(
        operand, *args)
    np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.skipif(not ON_ACCELERATOR, reason="ragged_all_to_all: GPU/TPU only")
def test_ragged_dispatch_with_the_real_collective():
    """The native ragged_all_to_all over every local accelerator (one is enough to run it)."""
    n = jax.local_device_count()
    mesh = jax.make_mesh((1, 1, n), parallel.MESH_AXES, devices=jax.local_devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(2)
    tokens = n * T_LOCAL
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    idx, w = skewed_routing(rng, tokens)
    ws = weights(rng)
    specs = (P("expert"),) * 3
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))

    def f(x, idx, w, wg, wu, wd):
        def per_device(x, idx, w, wg, wu, wd):
            return moe_parallel.ragged_dispatch(x, idx, w, wg, wu, wd, ep=n, impl="blocked",
                                                block_size=4, compute_dtype="float32")[0]
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(parallel.BATCH_AXES),) * 3
                             + specs, out_specs=P(parallel.BATCH_AXES))(x, idx, w, wg, wu, wd)

    args = [jax.device_put(a, rows) for a in (x, idx, w)]
    args += [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(ws, specs)]
    y = jax.jit(f)(*args)
    y_ref, _ = experts.dispatch_local(x, idx, w, *ws, impl="blocked", block_size=4,
                                      compute_dtype="float32")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 3)))(*args)
    g_ref = jax.grad(lambda x, wg: jnp.sum(experts.dispatch_local(
        x, idx, w, wg, ws[1], ws[2], impl="blocked", block_size=4,
        compute_dtype="float32")[0] ** 2), argnums=(0, 1))(x, ws[0])
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_moe_layer_reports_its_drops_on_a_mesh():
    """The MoE block on an ambient mesh: routed experts go expert-parallel, `dropped` is the
    exact count, and without a mesh the same layer is dropless."""
    c = default_config()
    c.model.d_model = D
    c.moe.update(num_experts=E, top_k=K, expert_hidden=F, capacity_factor=0.5,
                 dispatch="capacity", grouped_matmul="ragged_dot")
    layer = moe_lib.MoE(ModelConfig.from_config(c), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 8, D)).astype(np.float32)  # 8 rows of 8 tokens: one row per device
    seg = np.ones((8, 8), np.int32)
    seg[:, 6:] = 0  # two padding tokens per row: no assignments
    mesh = mesh_of((2, 1, 4))
    graphdef, state = nnx.split(layer)

    def run(state, x, seg):
        y, stats, _ = nnx.merge(graphdef, state)(x, seg)
        return y, stats

    y_local, stats_local = jax.jit(run, compiler_options=FAST_COMPILE)(state, x, seg)
    assert float(stats_local.dropped) == 0.0
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
        y, stats = jax.jit(run, compiler_options=FAST_COMPILE)(
            jax.device_put(state, parallel.state_shardings(state, mesh, c)),
            jax.device_put(x, rows), jax.device_put(seg, rows))

    logits = np.einsum("bsd,dr->bsr", x, np.asarray(layer.router[...]))
    decision = routing.route(jnp.asarray(logits), jnp.asarray(seg), K)
    idx = np.asarray(decision.expert_idx_BSK).reshape(-1, K)
    w = np.asarray(decision.weights_BSK).reshape(-1, K)
    cap = moe_parallel.capacity(8, K, E, 0.5)
    keep, dropped = numpy_capacity_keep(idx, w, 8, cap)
    assert dropped > 0 and float(stats.dropped) == dropped
    kept_rows = (keep | (w == 0)).all(-1)  # tokens none of whose assignments was dropped
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D)[kept_rows],
                               np.asarray(y_local).reshape(-1, D)[kept_rows], rtol=1e-5,
                               atol=1e-5)
    for name in ("counts_BR", "prob_sums_BR", "tokens_B", "z_sums_B"):
        np.testing.assert_allclose(getattr(stats, name), getattr(stats_local, name), rtol=1e-6,
                                   err_msg=name)


def test_dispatch_choice_and_capacity():
    assert moe_parallel.resolve_dispatch("capacity") == "capacity"
    if not ON_ACCELERATOR:
        assert moe_parallel.resolve_dispatch("auto") == "capacity"
        with pytest.raises(ValueError, match="does not implement"):
            moe_parallel.resolve_dispatch("ragged")
    else:
        assert moe_parallel.resolve_dispatch("auto") == "ragged"
    with pytest.raises(ValueError, match="valid: auto, capacity, ragged"):
        moe_parallel.resolve_dispatch("dense")
    assert moe_parallel.capacity(100, 4, 32, 1.25) == 16  # ceil(1.25 * 100 * 4 / 32) = 16
    assert moe_parallel.capacity(100, 4, 32, 100.0) == 100  # never more than T
    assert moe_parallel.capacity(3, 1, 64, 1.0) == 1


def test_megablox_runs_per_device_and_matches_one_device(monkeypatch):
    """The TPU grouped matmul (here in the Pallas interpreter) inside the per-device expert
    path: values and every gradient equal the one-device reference, weights sharded over fsdp."""
    from functools import partial

    from emo_jax.model import grouped_matmul

    monkeypatch.setattr(grouped_matmul, "megablox_swiglu",
                        partial(grouped_matmul.megablox_swiglu, interpret=True))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8 * T_LOCAL, D)).astype(np.float32)
    idx, w = skewed_routing(rng, 8 * T_LOCAL)
    ws = weights(rng)
    mesh = mesh_of((2, 4, 1))
    # d_model split everywhere (the layout before the default rules split down projections
    # along their hidden axis): both layouts gather correctly.
    specs = tuple(moe_parallel.weight_spec(axes, {"embed": "fsdp"}) for axes in (
        ("expert", "embed", "expert_mlp"),) * 2 + (("expert", "expert_mlp", "embed"),))
    assert specs[2] == P("expert", None, "fsdp")
    cos = jnp.cos(jnp.arange(D, dtype=jnp.float32))

    def loss(x, w, wg, wu, wd, sharded):
        if sharded:
            y, _, _ = moe_parallel.routed_experts(
                x, jnp.asarray(idx), w, wg, wu, wd, mesh=mesh, weight_specs=specs,
                dispatch="auto", capacity_factor=1.0, impl="megablox", block_size=4,
                compute_dtype="float32")
        else:
            y, _ = experts.dispatch_local(x, jnp.asarray(idx), w, wg, wu, wd, impl="ragged_dot",
                                          block_size=4, compute_dtype="float32")
        return jnp.sum(y * cos)

    g_ref = jax.grad(loss, argnums=range(5))(x, w, *ws, False)
    with jax.set_mesh(mesh):
        g = jax.jit(jax.grad(loss, argnums=range(5)), static_argnums=5,
                    compiler_options=FAST_COMPILE)(x, w, *ws, True)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
