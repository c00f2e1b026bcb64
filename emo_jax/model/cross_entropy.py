"""Token cross-entropy: the one home of its math.

* `token_cross_entropy(logits_TV, targets_T)`: from given logits (the dense reference; what the
  loss and evaluation code call when they hold logits).
* `chunked_head_cross_entropy(x_TD, head_DV, targets_T, chunk=...)`: the output head fused with
  the cross-entropy, chunk of positions by chunk, so at most [rows, chunk, V] float32 logits are live
  in the forward and in the backward pass (a custom VJP recomputes each chunk's logits from the
  saved per-token log-sum-exp). At V = 100k and 16k tokens per micro-batch the dense logits are
  6.5 GB in float32, and autodiff keeps them and their gradient.

Both return per-token (loss_T, lse_T) in float32: loss = lse - logit[target]; lse (the
log-sum-exp of the logits) feeds the output z-loss, sum(lse^2 * mask). Masking is the caller's.

Glossary: R rows, T positions (tokens), V vocabulary, D d_model, C chunk of positions.
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
    """The output head as the model computes it: a matmul in compute_dtype, float32 result
    (x of any leading shape [..., D])."""
    dt = jnp.dtype(compute_dtype)
    return jnp.einsum("...d,dv->...v", x_TD.astype(dt), head_DV.astype(dt)).astype(jnp.float32)


def chunked_head_cross_entropy(x_TD, head_DV, targets_T, *, chunk: int = 1024,
                               compute_dtype=jnp.float32):
    """(loss_T, lse_T) float32 of logits = head_logits(x_TD, head_DV), never all at once.

    x_TD: final-normed hidden states [..., T, D]; targets_T: int target ids [..., T]. The last
    leading axis (positions) is cut into chunks of `chunk` positions (padded up to a multiple
    internally; chunk <= 0 means one chunk); the axes before it (rows) stay whole in every
    chunk, so a batch sharded over rows stays sharded and no device gathers another's tokens.
    Gradients flow to x_TD and head_DV.
    """
    lead, d = x_TD.shape[:-1], x_TD.shape[-1]
    t = lead[-1] if lead else 1
    x_RTD = x_TD.reshape(-1, t, d)
    targets_RT = targets_T.reshape(-1, t).astype(jnp.int32)
    c = t if chunk <= 0 else max(1, min(chunk, t))
    tp = -(-t // c) * c
    if tp != t:
        x_RTD = jnp.pad(x_RTD, ((0, 0), (0, tp - t), (0, 0)))
        targets_RT = jnp.pad(targets_RT, ((0, 0), (0, tp - t)))
    loss_RT, lse_RT = _fused(x_RTD, head_DV, targets_RT, c, jnp.dtype(compute_dtype).name)
    return loss_RT[:, :t].reshape(lead), lse_RT[:, :t].reshape(lead)


def _chunk(x, i, c):
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _fused_forward(x_RTD, head_DV, targets_RT, c, dt):
    def body(i, carry):
        loss_RT, lse_RT = carry
        loss_RC, lse_RC = token_cross_entropy(head_logits(_chunk(x_RTD, i, c), head_DV, dt),
                                              _chunk(targets_RT, i, c))
        return (jax.lax.dynamic_update_slice_in_dim(loss_RT, loss_RC, i * c, 1),
                jax.lax.dynamic_update_slice_in_dim(lse_RT, lse_RC, i * c, 1))

    init = (jnp.zeros(targets_RT.shape, jnp.float32), jnp.zeros(targets_RT.shape, jnp.float32))
    return jax.lax.fori_loop(0, targets_RT.shape[1] // c, body, init)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x_RTD, head_DV, targets_RT, c, dt):
    return _fused_forward(x_RTD, head_DV, targets_RT, c, dt)


def _fused_fwd(x_RTD, head_DV, targets_RT, c, dt):
    loss_RT, lse_RT = _fused_forward(x_RTD, head_DV, targets_RT, c, dt)
    return (loss_RT, lse_RT), (x_RTD, head_DV, targets_RT, lse_RT)


def _fused_bwd(c, dt, residuals, cotangents):
    """d loss_t / d logit_tv = p_tv - [v = target_t]; d lse_t / d logit_tv = p_tv."""
    x_RTD, head_DV, targets_RT, lse_RT = residuals
    dloss_RT, dlse_RT = cotangents
    v = head_DV.shape[1]
    head_c = head_DV.astype(dt)

    def body(i, carry):
        dx_RTD, dhead_DV = carry
        x_RCD = _chunk(x_RTD, i, c)
        dloss_RC, dlse_RC = _chunk(dloss_RT, i, c), _chunk(dlse_RT, i, c)
        p_RCV = jnp.exp(head_logits(x_RCD, head_DV, dt) - _chunk(lse_RT, i, c)[..., None])
        onehot_RCV = jnp.arange(v) == _chunk(targets_RT, i, c)[..., None]
        dlogits_RCV = (p_RCV * (dloss_RC + dlse_RC)[..., None]
                       - jnp.where(onehot_RCV, dloss_RC[..., None], 0.0)).astype(dt)
        dx_RCD = jnp.einsum("rcv,dv->rcd", dlogits_RCV, head_c,
                            preferred_element_type=jnp.float32)
        dhead_DV = dhead_DV + jnp.einsum("rcd,rcv->dv", x_RCD.astype(dt), dlogits_RCV,
                                         preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(dx_RTD, dx_RCD, i * c, 1), dhead_DV

    init = (jnp.zeros(x_RTD.shape, jnp.float32), jnp.zeros(head_DV.shape, jnp.float32))
    dx_RTD, dhead_DV = jax.lax.fori_loop(0, x_RTD.shape[1] // c, body, init)
    return (dx_RTD.astype(x_RTD.dtype), dhead_DV.astype(head_DV.dtype),
            np.zeros(targets_RT.shape, jax.dtypes.float0))


_fused.defvjp(_fused_fwd, _fused_bwd)
