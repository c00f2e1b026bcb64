"""An instrumented forward pass: what the router of every MoE layer does with a batch of text.

`Probe(model)` runs the model's own forward (`Transformer.__call__`) with inference routing
(plain top-k, no document pool) and an optional subset mask, asks it for the intermediates it
needs (`capture=`), and returns per layer:

  mass_LR      sum over real tokens of the router softmax (over the experts allowed in the
               layer; all of them where the layer is not masked): the router-mass score
  tokens_L     real tokens (segment id != 0)
  probs_LBSR   (token_probs=True) the per-token router softmax, 0 at padding
  expert_idx_LBSK (assignments=True) the routed expert of every assignment, -1 where none
  easy_ep_LR   (easy_ep=True) the Easy-EP score of every expert (docs/METHOD.md, "Expert
               subsets"): sum over the tokens t routed to e of
                 gate_weight_te * ||Expert_e(x_t)|| * (1 - cos(h_t, h_t + moe_out_t))
               with h_t the residual stream entering the MoE sub-layer, x_t = RMSNorm(h_t) the
               experts' input, moe_out_t the MoE output (shared experts included)

The model computes every quantity (attention, routing, experts); this module only sums them
into scores, so selection always scores exactly the model that is served.

Glossary: B rows, S positions, K top-k, L layers, R routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def easy_ep_scores(captured: dict, num_routed: int):
    """[L, R] Easy-EP scores from the forward's 'expert_contrib' intermediates."""
    contribution_LBSK = (captured["gate_weights_BSK"] * captured["expert_out_norm_BSK"]
                         * captured["moe_turn_BS"][..., None])
    layers = contribution_LBSK.shape[0]
    idx_LA = jnp.maximum(captured["expert_idx_BSK"], 0).reshape(layers, -1)  # weight 0 at -1
    return jax.vmap(lambda idx_A, c_A: jnp.zeros((num_routed,), jnp.float32).at[idx_A].add(c_A))(
        idx_LA, contribution_LBSK.reshape(layers, -1))


# Compiled probes by (model config, outputs): models of one config share a graph structure, so
# the selection and analysis tools compile each probe once per process, not once per call.
_COMPILED = {}


class Probe:
    """Jitted instrumented forward of one model; `probe(batch, expert_mask_LR)` -> numpy dict."""

    def __init__(self, model, *, token_probs: bool = False, easy_ep: bool = False,
                 assignments: bool = False):
        self.config = model.config
        graphdef, self.state = nnx.split(model)
        key = (model.config, token_probs, easy_ep, assignments)
        if key not in _COMPILED:
            _COMPILED[key] = _build(graphdef, token_probs, easy_ep, assignments)
        self._run = _COMPILED[key]

    def __call__(self, batch: dict, expert_mask_LR=None) -> dict:
        mask = None if expert_mask_LR is None else jnp.asarray(expert_mask_LR, bool)
        out = self._run(self.state, jnp.asarray(batch["tokens"]),
                        jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]), mask)
        return {k: np.asarray(v) for k, v in out.items()}


def _build(graphdef, token_probs: bool, easy_ep: bool, assignments: bool):
    """The jitted probe of a graph structure."""
    wanted = {"router_probs": token_probs, "expert_contrib": easy_ep, "expert_idx": assignments}
    capture = tuple(name for name, on in wanted.items() if on)

    def run(state, tokens_BS, segment_ids_BS, positions_BS, expert_mask_LR):
        model = nnx.merge(graphdef, state)
        out = model(tokens_BS, segment_ids_BS, positions_BS, expert_mask_LR=expert_mask_LR,
                    use_eval_pool=False, capture=capture)
        result = {"mass_LR": out.routing.prob_sums_BR.sum(1),
                  "tokens_L": out.routing.tokens_B.sum(1)}
        if token_probs:
            result["probs_LBSR"] = out.captured["router_probs_BSR"]
        if assignments:
            result["expert_idx_LBSK"] = out.captured["expert_idx_BSK"]
        if easy_ep:
            result["easy_ep_LR"] = easy_ep_scores(out.captured, model.config.routed_experts)
        return result

    return jax.jit(run)
