"""Shared by the modular-tool tests: a tiny config and a float64 NumPy reference of the whole
Transformer (attention, RoPE, RMSNorm, router softmax over the allowed experts, top-k, SwiGLU
experts), written from docs/METHOD.md, not from the JAX code."""

import numpy as np
from flax import nnx

from emo_jax.config import default_config, validate


def tiny_config(**moe):
    c = default_config()
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   init_std=0.1)
    c.moe.update(num_experts=9, num_shared_experts=1, top_k=2, expert_hidden=32, pool_min=3,
                 pool_max=8, block_size=8)
    c.moe.update(**moe)
    c.data.update(seq_len=48, batch_size=4)
    return validate(c)


def random_model(config, seed=0):
    """A Transformer with NumPy-drawn weights: built by abstract evaluation, so no per-shape
    random kernels are compiled (model init dominated the tests' time on 2 cores)."""
    from emo_jax.model.transformer import Transformer
    from emo_jax.model.model_config import ModelConfig

    model_config = ModelConfig.from_config(config)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_config,
                                                                   rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(state)

    def fill(tree, name=""):
        if isinstance(tree, dict):
            return {k: fill(v, k) for k, v in tree.items()}
        base = 1.0 if name == "scale" else 0.0
        return (base + config.model.init_std * rng.standard_normal(tree.shape)).astype(np.float32)

    nnx.replace_by_pure_dict(state, fill(pure))
    return nnx.merge(graphdef, state)


def packed_row(docs, seq):
    """One row holding `docs` (lists of ids) back to back, then padding."""
    tokens, seg, pos = (np.zeros((1, seq), np.int32) for _ in range(3))
    at = 0
    for i, d in enumerate(docs, 1):
        n = len(d)
        tokens[0, at:at + n], seg[0, at:at + n], pos[0, at:at + n] = d, i, np.arange(n)
        at += n
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x_SHD, theta):
    s, _, dh = x_SHD.shape
    half = dh // 2
    inv = theta ** (-np.arange(half) * 2.0 / dh)
    ang = np.arange(s)[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x_SHD[..., :half], x_SHD[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _swiglu(x_SD, wg, wu, wd):
    g = x_SD @ wg
    return ((g / (1 + np.exp(-g))) * (x_SD @ wu)) @ wd


def reference_forward(model, ids, mask_LR=None):
    """One document through the model in float64. Returns per layer: router probabilities
    [L, S, R] (softmax over the allowed experts), Easy-EP scores [L, R], and logits [S, V]."""
    m = e = model.config
    p = nnx.to_pure_dict(nnx.state(model))
    b = p["blocks"]

    def get(*path):
        node = b
        for part in path[:-1]:
            node = node[part]
        return np.asarray(node[path[-1]], np.float64)

    ids = np.asarray(ids)
    s = len(ids)
    x = np.asarray(p["embed"])[ids]
    probs_L, easy_L = [], []
    group = m.num_heads // m.num_kv_heads
    causal = np.tril(np.ones((s, s), bool))
    for layer in range(m.num_layers):
        def w(*path):
            return get(*path)[layer]

        xa = _rms(x, w("attn_norm", "scale"), m.norm_eps)
        q = _rope(np.einsum("sd,dhk->shk", xa, w("attn", "wq")), m.rope_theta)
        k = _rope(np.einsum("sd,dhk->shk", xa, w("attn", "wk")), m.rope_theta)
        v = np.einsum("sd,dhk->shk", xa, w("attn", "wv"))
        out = np.zeros_like(q)
        for h in range(m.num_heads):
            logits = q[:, h] @ k[:, h // group].T / np.sqrt(m.head_dim)
            logits = np.where(causal, logits, -np.inf)
            a = np.exp(logits - logits.max(-1, keepdims=True))
            out[:, h] = (a / a.sum(-1, keepdims=True)) @ v[:, h // group]
        hres = x + np.einsum("shk,hkd->sd", out, w("attn", "wo"))
        xn = _rms(hres, w("moe_norm", "scale"), m.norm_eps)
        router_logits = xn @ w("moe", "router")
        allowed = np.ones(router_logits.shape[-1], bool) if mask_LR is None else mask_LR[layer]
        z = np.where(allowed, router_logits, -np.inf)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        probs_L.append(probs)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :e.top_k]
        y = np.zeros_like(xn)
        norms = np.zeros((s, e.top_k))
        for t in range(s):
            for j, ex in enumerate(top[t]):
                out_e = _swiglu(xn[t], w("moe", "w_gate")[ex], w("moe", "w_up")[ex],
                                w("moe", "w_down")[ex])
                norms[t, j] = np.linalg.norm(out_e)
                y[t] += probs[t, ex] * out_e
        shared_w = np.ones((s, e.num_shared_experts))  # one shared expert: weight 1.0
        if e.num_shared_experts > 1:  # the softmax over the shared experts' own logits
            zs = xn @ w("moe", "shared_router")
            zs = np.exp(zs - zs.max(-1, keepdims=True))
            shared_w = zs / zs.sum(-1, keepdims=True)
        for sh in range(e.num_shared_experts):
            y += shared_w[:, sh:sh + 1] * _swiglu(xn, w("moe", "shared_gate")[sh],
                                                  w("moe", "shared_up")[sh],
                                                  w("moe", "shared_down")[sh])
        new_x = hres + y
        cos = np.sum(hres * new_x, -1) / (np.linalg.norm(hres, axis=-1) *
                                          np.linalg.norm(new_x, axis=-1))
        easy = np.zeros(router_logits.shape[-1])
        for t in range(s):
            for j, ex in enumerate(top[t]):
                easy[ex] += probs[t, ex] * norms[t, j] * (1 - cos[t])
        easy_L.append(easy)
        x = new_x
    xf = _rms(x, np.asarray(p["final_norm"]["scale"], np.float64), m.norm_eps)
    return np.stack(probs_L), np.stack(easy_L), xf @ np.asarray(p["head"], np.float64)
