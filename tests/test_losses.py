"""Cross-entropy masking, balance loss in every scope, and z-losses against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model import losses


def test_targets_stay_inside_segments():
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 0]])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    targets, mask = losses.next_token_targets(tokens, seg)
    np.testing.assert_array_equal(targets[0, :4], [6, 7, 8, 9])
    # The last token of each segment predicts nothing; padding predicts nothing.
    np.testing.assert_array_equal(mask[0], [True, True, False, True, False, False])


def test_cross_entropy_and_output_z_equal_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.random((2, 5)) > 0.3
    ce, z, n = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    lse = np.log(np.exp(logits).sum(-1))
    ref_ce = ((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask).sum()
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-5)
    np.testing.assert_allclose(z, (lse ** 2 * mask).sum(), rtol=1e-5)
    assert n == mask.sum()


def numpy_switch(counts, probs, tokens, k):
    r = counts.shape[-1]
    t = max(tokens, 1)
    return r * np.sum(counts / (k * t) * probs / t) if tokens > 0 else 0.0


@pytest.fixture(scope="module")
def stats():
    rng = np.random.default_rng(1)
    L, B, R, K = 3, 8, 6, 2
    tokens = rng.integers(0, 20, size=(L, B)).astype(np.float32)
    tokens[:, 0] = 0
    counts = np.stack([np.stack([rng.multinomial(int(t) * K, np.ones(R) / R) for t in row])
                       for row in tokens]).astype(np.float32)
    probs = rng.random((L, B, R)).astype(np.float32) * tokens[..., None] / R * 2
    return counts, probs, tokens, K


def test_global_balance_equals_numpy(stats):
    counts, probs, tokens, k = stats
    got = losses.balance_loss_per_layer(*map(jnp.asarray, (counts, probs, tokens)), k, "global")
    ref = [numpy_switch(counts[l].sum(0), probs[l].sum(0), tokens[l].sum(), k) for l in range(3)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_sequence_and_local_scopes_equal_numpy(stats):
    counts, probs, tokens, k = stats
    got = losses.balance_loss_per_layer(*map(jnp.asarray, (counts, probs, tokens)), k, "sequence")
    for l in range(3):
        per_row = [numpy_switch(counts[l, b], probs[l, b], tokens[l, b], k)
                   for b in range(8) if tokens[l, b] > 0]
        np.testing.assert_allclose(got[l], np.mean(per_row), rtol=1e-5)
    got = losses.balance_loss_per_layer(*map(jnp.asarray, (counts, probs, tokens)), k, "local", 4)
    for l in range(3):
        shards = [numpy_switch(counts[l, 2 * i:2 * i + 2].sum(0), probs[l, 2 * i:2 * i + 2].sum(0),
                               tokens[l, 2 * i:2 * i + 2].sum(), k) for i in range(4)]
        np.testing.assert_allclose(got[l], np.mean(shards), rtol=1e-5)
    glob = losses.balance_loss_per_layer(*map(jnp.asarray, (counts, probs, tokens)), k, "global")
    assert not np.allclose(got, glob)


def test_balance_gradient_flows_through_probs_only(stats):
    counts, probs, tokens, k = stats
    def f(c, p):
        return losses.balance_loss_per_layer(c, p, jnp.asarray(tokens), k, "global").sum()
    gc, gp = jax.grad(f, argnums=(0, 1))(jnp.asarray(counts), jnp.asarray(probs))
    assert np.all(np.asarray(gc) == 0)
    assert np.abs(np.asarray(gp)).sum() > 0


def test_router_z_loss_equals_numpy(stats):
    _, _, tokens, _ = stats
    z = np.random.default_rng(2).random(tokens.shape).astype(np.float32)
    got = losses.router_z_loss_per_layer(jnp.asarray(z), jnp.asarray(tokens))
    np.testing.assert_allclose(got, z.sum(1) / tokens.sum(1), rtol=1e-6)
