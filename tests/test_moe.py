"""The dropless MoE layer against a dense reference (every expert on every token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.config import default_config
from emo_jax.model import experts
from emo_jax.model import moe as moe_lib
from emo_jax.model.model_config import ModelConfig
from emo_jax.model import routing
from emo_jax.model.grouped_matmul import grouped_swiglu

from test_routing import packed_segments


def dense_reference(x_BSD, layer, decision):
    """Every routed expert on every token, then the masked, weighted combine."""
    wg, wu, wd = (np.asarray(getattr(layer, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))
    x = np.asarray(x_BSD, np.float64)
    hidden = np.einsum("bsd,edf->bsef", x, wg)
    silu = hidden / (1 + np.exp(-hidden))
    all_BSED = np.einsum("bsef,efd->bsed", silu * np.einsum("bsd,edf->bsef", x, wu), wd)
    gates_BSE = np.zeros(all_BSED.shape[:3])
    idx, w = np.asarray(decision.expert_idx_BSK), np.asarray(decision.weights_BSK, np.float64)
    np.put_along_axis(gates_BSE, idx, w, -1)
    y = np.einsum("bsed,bse->bsd", all_BSED, gates_BSE)
    if layer.shared_gate is not None:
        sg, su, sd = (np.asarray(getattr(layer, n)[...], np.float64)
                      for n in ("shared_gate", "shared_up", "shared_down"))
        h = np.einsum("bsd,xdf->bsxf", x, sg)
        out_BSXD = np.einsum("bsxf,xfd->bsxd",
                             h / (1 + np.exp(-h)) * np.einsum("bsd,xdf->bsxf", x, su), sd)
        # the reference's formula (modeling_emo.py): a softmax over the shared experts' own
        # router logits weights each shared expert; one shared expert has weight 1.0
        shared_w_BSX = np.ones(out_BSXD.shape[:3])
        if sg.shape[0] > 1:
            z = np.einsum("bsd,dx->bsx", x, np.asarray(layer.shared_router[...], np.float64))
            z = np.exp(z - z.max(-1, keepdims=True))
            shared_w_BSX = z / z.sum(-1, keepdims=True)
        y += np.einsum("bsxd,bsx->bsd", out_BSXD, shared_w_BSX)
    return y


def make_layer(num_experts, shared, impl, top_k=2, d=16, f=24):
    c = default_config()
    c.model.d_model = d
    c.moe.update(num_experts=num_experts, num_shared_experts=shared, top_k=top_k,
                 expert_hidden=f, grouped_matmul=impl, block_size=4)
    return moe_lib.MoE(ModelConfig.from_config(c), rngs=nnx.Rngs(0)), c


# Every pair of (pool, shared experts, implementation) values occurs (a pairwise design), plus
# two and three shared experts.
@pytest.mark.parametrize("pool,shared,impl", [
    ("document", 0, "blocked"), ("none", 1, "blocked"), ("document", 1, "looped"),
    ("none", 0, "looped"), ("document", 0, "ragged_dot"), ("none", 1, "ragged_dot"),
    ("document", 2, "blocked"), ("none", 3, "ragged_dot")])
def test_dropless_matches_dense_reference(pool, shared, impl):
    layer, _ = make_layer(9 + shared if shared else 8, shared, impl)
    rng = np.random.default_rng(3)
    seg = jnp.asarray(packed_segments(rng, 3, 20))
    x = jnp.asarray(rng.normal(size=(3, 20, 16)).astype(np.float32))
    pool_size = jnp.full((3, 20), 4, jnp.int32) if pool == "document" else None
    y, stats, _ = nnx.jit(lambda layer, x: layer(x, seg, pool_size))(layer, x)
    logits = jnp.einsum("bsd,dr->bsr", x, layer.router[...])
    decision = routing.route(logits, seg, layer.config.top_k, pool_size)
    np.testing.assert_allclose(y, dense_reference(x, layer, decision), rtol=2e-4, atol=2e-5)

    # Gradients w.r.t. every parameter and the input equal the dense reference's.
    def loss(layer, x, dense):
        if dense:
            lg = jnp.einsum("bsd,dr->bsr", x, layer.router[...])
            dec = routing.route(lg, seg, layer.config.top_k, pool_size)
            gates = jnp.zeros(lg.shape).at[
                jnp.arange(3)[:, None, None], jnp.arange(20)[None, :, None], dec.expert_idx_BSK
            ].set(dec.weights_BSK)
            h = jax.nn.silu(jnp.einsum("bsd,edf->bsef", x, layer.w_gate[...])) * \
                jnp.einsum("bsd,edf->bsef", x, layer.w_up[...])
            out = jnp.einsum("bsef,efd,bse->bsd", h, layer.w_down[...], gates)
            if layer.shared_gate is not None:
                w_TX = None if layer.shared_router is None else jax.nn.softmax(
                    x.reshape(-1, 16) @ layer.shared_router[...], axis=-1)
                out = out + experts.shared_swiglu(x.reshape(-1, 16), layer.shared_gate[...],
                                                  layer.shared_up[...], layer.shared_down[...],
                                                  "float32", w_TX).reshape(out.shape)
        else:
            out, _, _ = layer(x, seg, pool_size)
        return jnp.sum(out * jnp.cos(jnp.arange(16.0)))

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_fast = grad(layer, x, False)
    g_dense = grad(layer, x, True)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert np.abs(np.asarray(g_fast[0].router[...])).sum() > 0
    assert (layer.shared_router is not None) == (shared > 1)  # one shared expert: no router
    if shared > 1:
        assert np.abs(np.asarray(g_fast[0].shared_router[...])).sum() > 0


def test_one_shared_expert_is_the_weight_one_sum():
    """X=1 has no shared router and no weights (the softmax over one logit is exactly 1.0): the
    shared output is the plain SwiGLU (the code path of before; tests/test_pinned_behaviour.py
    pins its numbers); X=2 with equal logits halves the sum."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(5, 16)).astype(np.float32))
    ws = [jnp.asarray(0.3 * rng.normal(size=s).astype(np.float32))
          for s in ((2, 16, 8), (2, 16, 8), (2, 8, 16))]
    one = experts.shared_swiglu(x, *(w[:1] for w in ws), "float32")
    h = jax.nn.silu(x @ ws[0][0]) * (x @ ws[1][0])
    np.testing.assert_allclose(one, h @ ws[2][0], rtol=1e-6, atol=1e-6)
    assert float(jax.nn.softmax(jnp.asarray([[3.7]]), axis=-1)[0, 0]) == 1.0
    both = experts.shared_swiglu(x, *ws, "float32")
    halves = experts.shared_swiglu(x, *ws, "float32", jnp.full((5, 2), 0.5))
    np.testing.assert_allclose(halves, 0.5 * both, rtol=1e-5, atol=1e-6)


def test_expert_rows_scale_with_assignments_not_experts():
    """At fixed tokens and top_k, the expert matmuls' rows stay ~tokens*top_k from 8 to 64 experts."""
    tokens, top_k, block = 512, 2, 4
    rng = np.random.default_rng(4)
    seg = jnp.ones((4, tokens // 4), jnp.int32)
    x = jnp.asarray(rng.normal(size=(4, tokens // 4, 16)).astype(np.float32))
    rows = {}
    for experts in (8, 64):
        layer, _ = make_layer(experts, 0, "blocked", top_k=top_k)
        _, stats, _ = nnx.jit(lambda layer, x: layer(x, seg, None))(layer, x)
        rows[experts] = float(stats.rows_processed)
        padding_bound = experts * (block - 1)
        assert rows[experts] <= 1.3 * tokens * top_k + padding_bound, rows
        assert rows[experts] >= tokens * top_k
    assert rows[64] <= 1.3 * rows[8], rows


@pytest.mark.parametrize("impl", ["blocked", "looped"])
def test_static_block_budget_is_worst_case_safe(impl):
    """All assignments on one expert, or spread one per expert: nothing is dropped."""
    layer, _ = make_layer(8, 0, impl, top_k=1)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 16)).astype(np.float32))
    for idx in (np.zeros((6, 1), np.int32), np.arange(6, dtype=np.int32)[:, None]):
        w = jnp.ones((6, 1))
        y, _ = experts.dispatch_local(x, jnp.asarray(idx), w, layer.w_gate[...], layer.w_up[...],
                                      layer.w_down[...], impl=impl, block_size=4,
                                      compute_dtype="float32")
        ref, _ = experts.dispatch_local(x, jnp.asarray(idx), w, layer.w_gate[...], layer.w_up[...],
                                        layer.w_down[...], impl="ragged_dot", block_size=4,
                                        compute_dtype="float32")
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(y)).min(-1).max() > 0


def test_looped_runs_only_the_used_blocks_and_matches_in_bfloat16():
    """The looped matmul's work is sum_e ceil(n_e / block) blocks (no spare ones); rows past the
    groups give zero output and zero gradient; bfloat16 agrees with float32 to bf16 precision."""
    rng = np.random.default_rng(6)
    group_sizes = jnp.asarray([5, 0, 9, 1, 0, 4], jnp.int32)  # 19 of 24 rows live
    x = jnp.asarray(rng.normal(size=(24, 16)).astype(np.float32))
    ws = [jnp.asarray(0.3 * rng.normal(size=s).astype(np.float32))
          for s in ((6, 16, 8), (6, 16, 8), (6, 8, 16))]

    def run(dtype):
        def loss(x, ws):
            y, rows = grouped_swiglu(x, group_sizes, *ws, impl="looped", block_size=4,
                                     compute_dtype=dtype)
            return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(16.0))), (y, rows)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, ws)

    (_, (y, rows)), (dx, _) = run("float32")
    assert int(rows) == 4 * (2 + 3 + 1 + 1)
    assert not np.asarray(y)[19:].any() and not np.asarray(dx)[19:].any()
    (_, (y16, _)), (dx16, dws16) = run("bfloat16")
    np.testing.assert_allclose(np.asarray(y16, np.float32), y, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(np.asarray(dx16, np.float32), dx, rtol=0.05, atol=0.05)
    assert all(w.dtype == jnp.float32 for w in dws16)
