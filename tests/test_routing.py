"""Document pools and top-k routing against brute-force NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model import routing

R, K = 12, 3


def packed_segments(rng, batch, seq):
    """Random rows of several segments followed by padding, ids 1..n in order."""
    seg = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, sid = 0, 1
        end = seq - rng.integers(0, seq // 4)
        while pos < end:
            length = int(rng.integers(1, seq // 3))
            seg[b, pos:min(pos + length, end)] = sid
            pos, sid = pos + length, sid + 1
    return seg


def numpy_pool_mask(logits, seg, pool_size):
    """For each token: the pool_size experts of largest softmax mass summed over its segment."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask = np.zeros(logits.shape, bool)
    for b in range(seg.shape[0]):
        for sid in set(seg[b].tolist()) - {0}:
            tokens = seg[b] == sid
            mass = probs[b, tokens].sum(0)
            top = sorted(range(R), key=lambda e: (-mass[e], e))[: pool_size[b, sid]]
            mask[b][np.ix_(np.flatnonzero(tokens), top)] = True
    return mask


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    seg = packed_segments(rng, 4, 40)
    logits = rng.normal(size=(4, 40, R)).astype(np.float32)
    pool = rng.integers(K, R + 3, size=(4, 40)).astype(np.int32)
    return logits, seg, pool


def test_pool_mask_equals_bruteforce(case):
    logits, seg, pool = case
    probs = jax.nn.softmax(jnp.asarray(logits), -1)
    got = np.asarray(routing.document_pool_mask(probs, jnp.asarray(seg), jnp.asarray(pool)))
    np.testing.assert_array_equal(got, numpy_pool_mask(logits, seg, pool))
    assert not got[seg == 0].any(), "padding must belong to no pool"


def test_topk_inside_pool_and_weights_not_renormalised(case):
    logits, seg, pool = case
    out = routing.route(jnp.asarray(logits), jnp.asarray(seg), K, jnp.asarray(pool))
    mask = numpy_pool_mask(logits, seg, pool)
    idx, w = np.asarray(out.expert_idx_BSK), np.asarray(out.weights_BSK)
    real = seg != 0
    inside = np.take_along_axis(mask, idx, -1)
    assert inside[real].all()
    # Reference weights: softmax renormalised over the pool, top-k values, no renormalisation.
    masked = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows are all -inf
        scores = np.exp(masked - masked.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    ref_w = -np.sort(-np.where(real[..., None], scores, 0), -1)[..., :K]
    np.testing.assert_allclose(w[real], ref_w[real], rtol=1e-5, atol=1e-7)
    assert (w[real].sum(-1) < 1 - 1e-4).any(), "top-k weights must not be renormalised"
    assert (w[~real] == 0).all()


def test_pool_of_a_segment_ignores_other_segments(case):
    logits, seg, pool = case
    probs = jax.nn.softmax(jnp.asarray(logits), -1)
    base = np.asarray(routing.document_pool_mask(probs, jnp.asarray(seg), jnp.asarray(pool)))
    rng = np.random.default_rng(1)
    changed = logits.copy()
    others = seg != 1
    changed[others] = rng.normal(size=changed[others].shape)
    probs2 = jax.nn.softmax(jnp.asarray(changed), -1)
    new = np.asarray(routing.document_pool_mask(probs2, jnp.asarray(seg), jnp.asarray(pool)))
    np.testing.assert_array_equal(new[seg == 1], base[seg == 1])
    assert (new[others & (seg != 0)] != base[others & (seg != 0)]).any()


def test_pool_at_least_routed_means_no_restriction(case):
    logits, seg, _ = case
    full = np.full(seg.shape, R, np.int32)
    a = routing.route(jnp.asarray(logits), jnp.asarray(seg), K, jnp.asarray(full))
    b = routing.route(jnp.asarray(logits), jnp.asarray(seg), K, None)
    np.testing.assert_array_equal(a.expert_idx_BSK, b.expert_idx_BSK)
    np.testing.assert_allclose(a.weights_BSK, b.weights_BSK, rtol=1e-6)


def test_statistics_ignore_padding(case):
    logits, seg, pool = case
    out = routing.route(jnp.asarray(logits), jnp.asarray(seg), K, jnp.asarray(pool))
    real = (seg != 0).sum(-1)
    np.testing.assert_array_equal(out.tokens_B, real)
    np.testing.assert_allclose(out.counts_BR.sum(-1), real * K)
    np.testing.assert_allclose(out.prob_sums_BR.sum(-1), real, rtol=1e-5)
    garbage = logits.copy()
    garbage[seg == 0] = 1e3
    out2 = routing.route(jnp.asarray(garbage), jnp.asarray(seg), K, jnp.asarray(pool))
    for field in ("counts_BR", "prob_sums_BR", "z_sums_B", "tokens_B"):
        np.testing.assert_allclose(getattr(out2, field), getattr(out, field), rtol=1e-5)
    segments = np.array([len(set(r.tolist()) - {0}) for r in seg])
    np.testing.assert_array_equal(out.segments_B, segments)


def test_expert_mask_excludes_experts(case):
    logits, seg, _ = case
    keep = np.zeros(R, bool)
    keep[[1, 4]] = True  # fewer than top_k: the spare assignments get weight 0
    out = routing.route(jnp.asarray(logits), jnp.asarray(seg), K, None, jnp.asarray(keep))
    w, idx = np.asarray(out.weights_BSK), np.asarray(out.expert_idx_BSK)
    assert keep[idx[w > 0]].all()
    np.testing.assert_allclose(w[seg != 0].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.counts_BR.sum(-1), (seg != 0).sum(-1) * 2)


def test_gradients_reach_router_only_through_weights():
    rng = np.random.default_rng(2)
    seg = jnp.asarray(packed_segments(rng, 2, 24))
    logits = jnp.asarray(rng.normal(size=(2, 24, R)).astype(np.float32))
    pool = jnp.full((2, 24), 5, jnp.int32)

    def through(name):
        def f(lg):
            out = routing.route(lg, seg, K, pool)
            return {"weights": out.weights_BSK.sum(), "probs": (out.prob_sums_BR ** 2).sum(),
                    "z": out.z_sums_B.sum(), "counts": out.counts_BR.sum()}[name]
        return np.abs(np.asarray(jax.grad(f)(logits))).sum()

    assert through("weights") > 0
    assert through("probs") > 0
    assert through("z") > 0
    assert through("counts") == 0, "counts (and so the pool choice / indices) carry no gradient"


@pytest.mark.parametrize("experts", [R, routing.PAIRWISE_RANK_MAX_EXPERTS + 3])
def test_top_p_mask_breaks_ties_by_expert_id_like_a_stable_sort(experts):
    """Both rank methods (pairwise for few experts, sorted threshold for many)."""
    rng = np.random.default_rng(3)
    # Few distinct values, so most rows have ties at the threshold.
    mass = rng.integers(0, 4, size=(6, 9, experts)).astype(np.float32)
    p = rng.integers(0, experts + 3, size=(6, 9)).astype(np.int32)
    got = np.asarray(routing.top_p_mask(jnp.asarray(mass), jnp.asarray(p)))
    want = np.zeros_like(got)
    for b in range(6):
        for n in range(9):
            top = sorted(range(experts), key=lambda e: (-mass[b, n, e], e))[: max(1, p[b, n])]
            want[b, n, top] = True
    np.testing.assert_array_equal(got, want)
