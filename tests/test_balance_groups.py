"""`moe.balance_group_rows`: strided balance groups of the global batch, independent of the
micro-batching. A group of the whole step is the 'global' scope, a group of one micro-batch the
'micro_batch' scope (loss, metrics and gradients); one-row groups are the 'sequence' scope; and
the loss of a group size does not depend on how many micro-batches the step is split into."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from emo_jax import parallel
from emo_jax.config import ConfigError, default_config, validate
from emo_jax.model import losses
from emo_jax.train import step as step_lib

ROWS = 8


def _config(micro_batches=1, scope="global", group_rows=0, devices=2):
    c = default_config()
    c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 2
    c.model.num_kv_heads, c.model.head_dim = 2, 16
    c.moe.num_experts, c.moe.top_k, c.moe.expert_hidden = 8, 2, 16
    # A fixed pool size keeps the pools independent of the micro-batch keys.
    c.moe.pool_min = c.moe.pool_max = 4
    c.moe.balance_scope = scope
    c.moe.balance_group_rows = group_rows
    c.data.seq_len, c.data.batch_size = 16, ROWS
    c.train.micro_batches = micro_batches
    c.mesh.data = devices
    return validate(c)


def _batch(rows=ROWS, seq=16, seed=0):
    """Rows with different numbers of segments and of padding tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 250, (rows, seq)).astype(np.int32)
    segment_ids = np.ones((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        segment_ids[r, 3 + r:] = 2
        segment_ids[r, seq - (r % 4):] = 0
        for s in range(1, seq):
            same = segment_ids[r, s] == segment_ids[r, s - 1]
            positions[r, s] = positions[r, s - 1] + 1 if same else 0
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


_STATES = {}


def _state(devices):
    if devices not in _STATES:
        config = _config(devices=devices)
        mesh = parallel.make_mesh(config, jax.devices()[:devices])
        _STATES[devices] = mesh, step_lib.init_state(config, mesh)[1]
    return _STATES[devices]


def _run(config, devices):
    mesh, state = _state(devices)
    graphdef = nnx.split(nnx.eval_shape(lambda: step_lib.TrainState(config).model))[0]

    @jax.jit
    def f(params, batch):
        return step_lib.loss_and_grads(graphdef, params, batch, config, jax.random.PRNGKey(3),
                                       parallel.batch_shards(mesh), mesh)

    with jax.set_mesh(mesh):
        loss, metrics, grads = f(state["model"], parallel.host_to_global(_batch(), mesh))
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


def _assert_same(a, b, grads=True):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for name in ("cross_entropy", "balance_loss", "router_z_loss"):
        np.testing.assert_allclose(a[1][name], b[1][name], rtol=1e-5, err_msg=name)
    if grads:
        flat_a, flat_b = jax.tree.leaves(a[2]), jax.tree.leaves(b[2])
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b):
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def test_whole_step_group_is_global_and_micro_batch_group_is_micro_batch():
    """On a 2-device mesh (the one-device path: test_one_row_groups_are_the_sequence_scope)."""
    micro, devices = 4, 2
    _assert_same(_run(_config(micro, group_rows=ROWS, devices=devices), devices),
                 _run(_config(micro, "global", devices=devices), devices))
    _assert_same(_run(_config(micro, group_rows=ROWS // micro, devices=devices), devices),
                 _run(_config(micro, "micro_batch", devices=devices), devices))


def test_group_loss_does_not_depend_on_micro_batches():
    # 4-row groups: inside the batch (M=1), spanning two micro-batches each (M=4, through the
    # pre-pass); groups equal to the micro-batches: the micro_batch test above.
    results = [_run(_config(m, group_rows=4), 2) for m in (1, 4)]
    for other in results[1:]:
        _assert_same(other, results[0])
    # Smaller groups are less balanced than the whole step.
    whole = _run(_config(1, group_rows=ROWS), 2)
    assert results[0][1]["balance_loss"] > whole[1]["balance_loss"] * (1 + 1e-4)


def test_one_row_groups_are_the_sequence_scope():
    """On one device."""
    _assert_same(_run(_config(2, group_rows=1, devices=1), 1),
                 _run(_config(1, "sequence", devices=1), 1), grads=False)


def test_groups_are_strided_rows():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, (1, 6, 3)).astype(np.float32)
    probs = rng.random((1, 6, 3)).astype(np.float32)
    tokens = counts.sum(-1) / 2
    got = losses.grouped_balance_loss(counts, probs, tokens, 2, groups=2)
    want = np.mean([losses.switch_balance_loss(counts[:, k::2].sum(1), probs[:, k::2].sum(1),
                                               tokens[:, k::2].sum(1), 2) for k in range(2)], 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("batch,micro,rows,scope,message", [
    (16, 1, 3, "global", "must divide data.batch_size"),
    (24, 4, 4, "global", "divide or be a multiple of the rows of one micro-batch"),
    (16, 1, 8, "micro_batch", "must then stay 'global'"),
])
def test_validation(batch, micro, rows, scope, message):
    c = default_config()
    c.data.batch_size, c.train.micro_batches = batch, micro
    c.moe.balance_group_rows, c.moe.balance_scope = rows, scope
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_valid_group_sizes():
    c = default_config()
    c.data.batch_size, c.train.micro_batches = 16, 4
    for rows in (1, 2, 4, 8, 16):  # divisors and multiples of the 4 rows of a micro-batch
        c.moe.balance_group_rows = rows
        validate(c)
