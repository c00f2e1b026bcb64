"""Token cross-entropy: the one home of its math.

* `token_cross_entropy(logits_TV, targets_T)`: from given logits (the dense reference; what the
  loss and evaluation code call when they hold logits).
* `chunked_head_cross_entropy(x_TD, head_DV, targets_T, chunk=...)`: the output head fused with
  the cross-entropy, token chunk by token chunk, so at most [chunk, V] float32 logits are live
  in the forward and in the backward pass (a custom VJP recomputes each chunk's logits from the
  saved per-token log-sum-exp). At V = 100k and 16k tokens per micro-batch the dense logits are
  6.5 GB in float32, and autodiff keeps them and their gradient.

Both return per-token (loss_T, lse_T) in float32: loss = lse - logit[target]; lse (the
log-sum-exp of the logits) feeds the output z-loss, sum(lse^2 * mask). Masking is the caller's.

Glossary: T tokens, V vocabulary, D d_model, C chunk of tokens, N chunks.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def token_cross_entropy(logits_TV, targets_T):
    """(loss_T, lse_T) float32 from logits of any leading shape [..., V] and targets [...]."""
    logits_TV = logits_TV.astype(jnp.float32)
    lse_T = jax.nn.logsumexp(logits_TV, axis=-1)
    target_logit_T = jnp.take_along_axis(logits_TV, targets_T[..., None], axis=-1)[..., 0]
    return lse_T - target_logit_T, lse_T


def head_logits(x_TD, head_DV, compute_dtype=jnp.float32):
    """The output head as the model computes it: a matmul in compute_dtype, float32 result."""
    dt = jnp.dtype(compute_dtype)
    return jnp.dot(x_TD.astype(dt), head_DV.astype(dt)).astype(jnp.float32)


def chunked_head_cross_entropy(x_TD, head_DV, targets_T, *, chunk: int = 1024,
                               compute_dtype=jnp.float32):
    """(loss_T, lse_T) float32 of logits = head_logits(x_TD, head_DV), never all at once.

    x_TD: final-normed hidden states of T tokens (any leading shape [..., D] is flattened);
    targets_T: int target ids, same leading shape. chunk: tokens per chunk (T is padded up to a
    multiple internally); chunk <= 0 means one chunk of all T tokens (the dense logits).
    Gradients flow to x_TD and head_DV.
    """
    lead = x_TD.shape[:-1]
    d = x_TD.shape[-1]
    x_TD = x_TD.reshape(-1, d)
    targets_T = targets_T.reshape(-1).astype(jnp.int32)
    t = x_TD.shape[0]
    c = t if chunk <= 0 else max(1, min(chunk, t))
    tp = -(-t // c) * c
    if tp != t:
        x_TD = jnp.pad(x_TD, ((0, tp - t), (0, 0)))
        targets_T = jnp.pad(targets_T, (0, tp - t))
    loss_T, lse_T = _fused(x_TD, head_DV, targets_T, c, jnp.dtype(compute_dtype).name)
    return loss_T[:t].reshape(lead), lse_T[:t].reshape(lead)


def _fused_forward(x_TD, head_DV, targets_T, c, dt):
    t = x_TD.shape[0]

    def body(i, carry):
        loss_T, lse_T = carry
        x_CD = jax.lax.dynamic_slice_in_dim(x_TD, i * c, c)
        tgt_C = jax.lax.dynamic_slice_in_dim(targets_T, i * c, c)
        loss_C, lse_C = token_cross_entropy(head_logits(x_CD, head_DV, dt), tgt_C)
        return (jax.lax.dynamic_update_slice_in_dim(loss_T, loss_C, i * c, 0),
                jax.lax.dynamic_update_slice_in_dim(lse_T, lse_C, i * c, 0))

    init = (jnp.zeros((t,), jnp.float32), jnp.zeros((t,), jnp.float32))
    return jax.lax.fori_loop(0, t // c, body, init)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x_TD, head_DV, targets_T, c, dt):
    return _fused_forward(x_TD, head_DV, targets_T, c, dt)


def _fused_fwd(x_TD, head_DV, targets_T, c, dt):
    loss_T, lse_T = _fused_forward(x_TD, head_DV, targets_T, c, dt)
    return (loss_T, lse_T), (x_TD, head_DV, targets_T, lse_T)


def _fused_bwd(c, dt, residuals, cotangents):
    """d loss_t / d logit_tv = p_tv - [v = target_t]; d lse_t / d logit_tv = p_tv."""
    x_TD, head_DV, targets_T, lse_T = residuals
    dloss_T, dlse_T = cotangents
    t, v = x_TD.shape[0], head_DV.shape[1]
    head_c = head_DV.astype(dt)

    def body(i, carry):
        dx_TD, dhead_DV = carry
        x_CD = jax.lax.dynamic_slice_in_dim(x_TD, i * c, c)
        tgt_C = jax.lax.dynamic_slice_in_dim(targets_T, i * c, c)
        lse_C = jax.lax.dynamic_slice_in_dim(lse_T, i * c, c)
        dloss_C = jax.lax.dynamic_slice_in_dim(dloss_T, i * c, c)
        dlse_C = jax.lax.dynamic_slice_in_dim(dlse_T, i * c, c)
        p_CV = jnp.exp(head_logits(x_CD, head_DV, dt) - lse_C[:, None])
        onehot_CV = jnp.arange(v)[None, :] == tgt_C[:, None]
        dlogits_CV = (p_CV * (dloss_C + dlse_C)[:, None]
                      - jnp.where(onehot_CV, dloss_C[:, None], 0.0)).astype(dt)
        dx_CD = jnp.dot(dlogits_CV, head_c.T, preferred_element_type=jnp.float32)
        dhead_DV = dhead_DV + jnp.dot(x_CD.astype(dt).T, dlogits_CV,
                                      preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(dx_TD, dx_CD, i * c, 0), dhead_DV

    init = (jnp.zeros(x_TD.shape, jnp.float32), jnp.zeros(head_DV.shape, jnp.float32))
    dx_TD, dhead_DV = jax.lax.fori_loop(0, t // c, body, init)
    return (dx_TD.astype(x_TD.dtype), dhead_DV.astype(head_DV.dtype),
            np.zeros(targets_T.shape, jax.dtypes.float0))


_fused.defvjp(_fused_fwd, _fused_bwd)
