"""The jitted train step: gradient accumulation equals one big batch for the global balance
scope, and a non-finite step is skipped and counted without touching the parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from emo_jax import parallel
from emo_jax.config import default_config
from emo_jax.train import step as step_lib


def _config(micro_batches=1, scope="global", inject=0):
    c = default_config()
    c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 2
    c.model.num_kv_heads, c.model.head_dim = 2, 16
    c.moe.num_experts, c.moe.top_k, c.moe.expert_hidden = 8, 2, 16
    # A fixed pool size keeps the pools independent of the PRNG key (micro-batches draw their
    # own keys); 4 < 8 routed experts, so the pool restriction is real.
    c.moe.pool_min = c.moe.pool_max = 4
    c.moe.balance_scope = scope
    c.data.seq_len, c.data.batch_size = 16, 8
    c.train.micro_batches = micro_batches
    c.train.inject_nonfinite_step = inject
    c.mesh.data = 2
    return c


def _batch(rows=8, seq=16, seed=0):
    """Rows with different numbers of segments and of padding tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 250, (rows, seq)).astype(np.int32)
    segment_ids = np.ones((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        cut, pad = 3 + r, seq - (r % 4)
        segment_ids[r, cut:] = 2
        segment_ids[r, pad:] = 0
        for s in range(1, seq):
            same = segment_ids[r, s] == segment_ids[r, s - 1]
            positions[r, s] = positions[r, s - 1] + 1 if same else 0
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _loss_and_grads(config, mesh, state, batch):
    graphdef = nnx.split(nnx.eval_shape(lambda: step_lib.TrainState(config).model))[0]

    @jax.jit
    def f(params, batch):
        return step_lib.loss_and_grads(graphdef, params, batch, config, jax.random.PRNGKey(3),
                                       parallel.batch_shards(mesh), mesh)

    with jax.set_mesh(mesh):
        loss, metrics, grads = f(state["model"], parallel.host_to_global(batch, mesh))
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


@pytest.fixture(scope="module")
def setup():
    config = _config()
    mesh = parallel.make_mesh(config, jax.devices()[:2])
    _, state, _ = step_lib.init_state(config, mesh)
    return mesh, state, _batch()


def test_micro_batches_equal_one_big_batch_for_global_balance(setup):
    mesh, state, batch = setup
    loss1, m1, g1 = _loss_and_grads(_config(1), mesh, state, batch)
    loss4, m4, g4 = _loss_and_grads(_config(4), mesh, state, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for name in ("cross_entropy", "balance_loss", "router_z_loss", "output_z_loss"):
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(m4["counts_LR"], m1["counts_LR"])
    np.testing.assert_allclose(m4["max_load_ratio_L"], m1["max_load_ratio_L"], rtol=1e-6)
    flat1, flat4 = jax.tree.leaves(g1), jax.tree.leaves(g4)
    assert len(flat1) == len(flat4) > 0
    for a, b in zip(flat1, flat4):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_micro_batch_scope_balances_each_micro_batch(setup):
    mesh, state, batch = setup
    _, m_global, _ = _loss_and_grads(_config(4, "global"), mesh, state, batch)
    _, m_micro, _ = _loss_and_grads(_config(4, "micro_batch"), mesh, state, batch)
    # Per-micro-batch statistics are less balanced than the step's: the loss is larger.
    assert m_micro["balance_loss"] > m_global["balance_loss"] * (1 + 1e-4)
    np.testing.assert_allclose(m_micro["cross_entropy"], m_global["cross_entropy"], rtol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(setup):
    mesh, fresh, batch = setup
    config = _config(inject=1)
    graphdef, _, shardings = step_lib.abstract_state(config, mesh)
    state = jax.tree.map(lambda x: x.copy(), fresh)  # the step donates its input
    before = jax.device_get(state["model"])
    opt_before = jax.device_get(state["optimizer"])  # Adam moments, counts: all of it
    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
    assert not np.isfinite(float(metrics["loss"])) and float(metrics["step_ok"]) == 0.0
    after = jax.device_get(state["model"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(state["step"][...]) == 1 and int(state["skipped"][...]) == 1
    assert int(state["bad_in_a_row"][...]) == 1
    assert int(state["optimizer"]["step"][...]) == 0  # the optimizer never saw the step
    opt_after = jax.device_get(state["optimizer"])
    assert len(jax.tree.leaves(opt_before)) == len(jax.tree.leaves(opt_after)) > 2
    for a, b in zip(jax.tree.leaves(opt_before), jax.tree.leaves(opt_after)):
        np.testing.assert_array_equal(a, b)
    state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["step_ok"]) == 1.0
    assert int(state["skipped"][...]) == 1 and int(state["bad_in_a_row"][...]) == 0
    assert int(state["optimizer"]["step"][...]) == 1
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["model"])))]
    assert all(changed)


def test_pool_off_fraction_trains_the_last_steps_without_pools(setup):
    """moe.pool_off_fraction=0.5 of 4 steps: steps 1-2 draw pools of 4, steps 3-4 route plain
    top-k, and their loss is the standard MoE's loss of the same parameters."""
    mesh, fresh, batch = setup
    config = _config()
    config.train.steps, config.moe.pool_off_fraction = 4, 0.5
    assert step_lib.pool_steps_of(config) == 2
    graphdef, _, shardings = step_lib.abstract_state(config, mesh)
    state = jax.tree.map(lambda x: x.copy(), fresh)
    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    pools = []
    for _ in range(2):
        state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
        pools.append(float(metrics["mean_pool_size"]))
    standard = _config()
    standard.moe.pool = "none"
    expected, _, _ = _loss_and_grads(standard, mesh, state, batch)
    state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
    assert pools == [4.0, 4.0] and float(metrics["mean_pool_size"]) == 8.0
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
