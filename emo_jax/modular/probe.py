"""An instrumented forward pass: what the router of every MoE layer does with a batch of text.

`Probe(model)` runs the model's own blocks (attention, norms, MoE modules) layer by layer in a
scan, exactly as `Transformer.__call__` composes them, with inference routing (plain top-k, no
document pool) and an optional subset mask, and returns per layer:

  mass_LR      sum over real tokens of the router softmax (over the experts allowed in the
               layer; all of them where the layer is not masked): the router-mass score
  tokens_L     real tokens (segment id != 0)
  probs_LBSR   (token_probs=True) the per-token router softmax, 0 at padding
  easy_ep_LR   (easy_ep=True) the Easy-EP score of every expert (EMO_METHOD.md section 4):
               sum over the tokens t routed to e of
                 gate_weight_te * ||Expert_e(x_t)|| * (1 - cos(h_t, h_t + moe_out_t))
               with h_t the residual stream entering the MoE sub-layer, x_t = RMSNorm(h_t) the
               experts' input, moe_out_t the MoE output (shared experts included)

The Easy-EP expert outputs are computed for the routed assignments only (sorted by expert and
run through the same grouped matmul as the model), never densely over experts.

Glossary: B rows, S positions, T = B*S tokens, K top-k, A = T*K assignments, L layers,
R routed experts, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model import routing
from emo_jax.model.grouped_matmul import grouped_swiglu
from emo_jax.model.layers import NEG_INF
from emo_jax.model.moe import sort_assignments


def _easy_ep_scores(moe, x_BSD, h_BSD, out_BSD, decision):
    """[R] Easy-EP scores of one layer (module docstring)."""
    b, s, d = x_BSD.shape
    r = moe.router.shape[-1]
    expert_idx_TK = decision.expert_idx_BSK.reshape(b * s, -1)
    weights_TK = decision.weights_BSK.reshape(b * s, -1)
    t, k = expert_idx_TK.shape
    order_A, group_sizes_R = sort_assignments(expert_idx_TK, weights_TK, r)
    y_sorted_AD, _ = grouped_swiglu(
        x_BSD.reshape(t, d)[order_A // k], group_sizes_R, moe.w_gate[...], moe.w_up[...],
        moe.w_down[...], impl=moe.impl, block_size=moe.block_size,
        compute_dtype=moe.compute_dtype)
    norm_sorted_A = jnp.linalg.norm(y_sorted_AD.astype(jnp.float32), axis=-1)
    norm_TK = jnp.zeros_like(norm_sorted_A).at[order_A].set(norm_sorted_A).reshape(t, k)
    h_TD = h_BSD.reshape(t, d).astype(jnp.float32)
    out_TD = out_BSD.reshape(t, d).astype(jnp.float32)
    cos_T = jnp.sum(h_TD * out_TD, -1) / jnp.maximum(
        jnp.linalg.norm(h_TD, axis=-1) * jnp.linalg.norm(out_TD, axis=-1), 1e-30)
    contribution_TK = weights_TK * norm_TK * (1.0 - cos_T)[:, None]  # weight 0 at padding
    return jnp.zeros((r,), jnp.float32).at[expert_idx_TK].add(contribution_TK)


# Compiled probes by (config, outputs): models of one config share a graph structure, so the
# selection and analysis tools compile each probe once per process, not once per call.
_COMPILED = {}


class Probe:
    """Jitted instrumented forward of one model; `probe(batch, expert_mask_LR)` -> numpy dict."""

    def __init__(self, model, *, token_probs: bool = False, easy_ep: bool = False):
        self.config = model.config
        graphdef, self.state = nnx.split(model)
        key = (model.config.to_json(), token_probs, easy_ep)
        if key not in _COMPILED:
            _COMPILED[key] = _build(graphdef, token_probs, easy_ep)
        self._run = _COMPILED[key]

    def __call__(self, batch: dict, expert_mask_LR=None) -> dict:
        mask = None if expert_mask_LR is None else jnp.asarray(expert_mask_LR, bool)
        out = self._run(self.state, jnp.asarray(batch["tokens"]),
                        jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]), mask)
        names = {"mass_R": "mass_LR", "tokens": "tokens_L", "probs_BSR": "probs_LBSR",
                 "easy_ep_R": "easy_ep_LR"}
        return {names[k]: np.asarray(v) for k, v in out.items()}


def _build(graphdef, token_probs: bool, easy_ep: bool):
    """The jitted probe of a graph structure."""

    def run(state, tokens_BS, segment_ids_BS, positions_BS, expert_mask_LR):
        model = nnx.merge(graphdef, state)
        x_BSD = model.embed[...][tokens_BS]
        real_BS = segment_ids_BS != 0

        def body(x_BSD, block, mask_R):
            h_BSD = x_BSD + block.attn(block.attn_norm(x_BSD), segment_ids_BS, positions_BS)
            xn_BSD = block.moe_norm(h_BSD)
            y_BSD, stats = block.moe(xn_BSD, segment_ids_BS, None, mask_R)
            out_BSD = h_BSD + y_BSD
            result = {"mass_R": stats["prob_sums"].sum(0), "tokens": stats["tokens"].sum()}
            if token_probs or easy_ep:
                logits_BSR = jnp.einsum("bsd,dr->bsr", xn_BSD.astype(jnp.float32),
                                        block.moe.router[...])
            if token_probs:
                allowed_BSR = jnp.broadcast_to(real_BS[..., None], logits_BSR.shape)
                if mask_R is not None:
                    allowed_BSR = allowed_BSR & mask_R
                probs_BSR = jax.nn.softmax(jnp.where(allowed_BSR, logits_BSR, NEG_INF), -1)
                result["probs_BSR"] = probs_BSR * allowed_BSR
            if easy_ep:
                decision = routing.route(logits_BSR, segment_ids_BS, block.moe.top_k, None,
                                         mask_R)
                result["easy_ep_R"] = _easy_ep_scores(block.moe, xn_BSD, h_BSD, out_BSD,
                                                      decision)
            return out_BSD, result

        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        _, per_layer = scan(x_BSD, model.blocks, expert_mask_LR)
        return per_layer

    return jax.jit(run)
