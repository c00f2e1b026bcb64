"""Choosing a subset of experts for a task from a little calibration text (docs/METHOD.md §8.1).

Every method scores the R routed experts of each layer and keeps the K - S best (ties: the lower
id), plus the S shared experts, which are always kept:

  layerwise  the reference: router mass (the router softmax averaged over the real tokens of
             the calibration text), chosen greedily layer by layer; layer l is scored with the
             subsets of layers < l already applied (masked, softmax renormalised over the kept
             experts), so it sees the hidden states the pruned model will really produce.
             Costs L forward passes over the calibration text.
  global     router mass of all layers from one pass of the full model.
  easy_ep    Easy-EP scores (see probe.py) from one pass of the full model, per real token.
  random     uniform random scores from `seed`: the control that separates the benefit of a
             chosen subset from robustness to a restricted router. Needs no text.

Inference routing throughout (plain top-k, no document pool), whatever the config's eval_pool.
"""

from __future__ import annotations

import numpy as np

from emo_jax.modular import subset as subset_lib
from emo_jax.modular.probe import Probe

METHODS = ("layerwise", "global", "easy_ep", "random")


def top_experts(scores_R, count: int) -> list[int]:
    """Ids of the `count` largest scores (ties: lower id first), ascending."""
    scores_R = np.asarray(scores_R, np.float64)
    order = np.lexsort((np.arange(scores_R.shape[0]), -scores_R))
    return sorted(int(e) for e in order[:count])


def _require_tokens(tokens_L):
    if not np.all(tokens_L > 0):
        raise subset_lib.SubsetError("the calibration text holds no token to score experts with")


def router_mass(probe: Probe, batches, expert_mask_LR=None) -> np.ndarray:
    """[L, R] float64: the router softmax averaged over every real token of `batches`."""
    mass_LR = tokens_L = 0.0
    for batch in batches:
        out = probe(batch, expert_mask_LR)
        mass_LR = mass_LR + out["mass_LR"].astype(np.float64)
        tokens_L = tokens_L + out["tokens_L"].astype(np.float64)
    _require_tokens(np.asarray(tokens_L))
    return mass_LR / tokens_L[:, None]


def easy_ep(probe: Probe, batches) -> np.ndarray:
    """[L, R] float64: Easy-EP scores summed over `batches`, divided by their real tokens."""
    score_LR = tokens_L = 0.0
    for batch in batches:
        out = probe(batch)
        score_LR = score_LR + out["easy_ep_LR"].astype(np.float64)
        tokens_L = tokens_L + out["tokens_L"].astype(np.float64)
    _require_tokens(np.asarray(tokens_L))
    return score_LR / tokens_L[:, None]


def layerwise(probe: Probe, batches, count: int):
    """(kept ids per layer, [L, R] scores): greedy, layer l scored with layers < l pruned."""
    layers, routed = probe.config.num_layers, probe.config.routed_experts
    mask_LR = np.ones((layers, routed), bool)
    scores_LR = np.zeros((layers, routed))
    kept = []
    for layer in range(layers):
        scores_LR[layer] = router_mass(probe, batches, mask_LR)[layer]
        kept.append(top_experts(scores_LR[layer], count))
        mask_LR[layer] = False
        mask_LR[layer, kept[-1]] = True
    return kept, scores_LR


def scores_for(method: str, model, batches, *, seed: int = 0):
    """[L, R] scores of a one-pass method ('global', 'easy_ep', 'random')."""
    if method == "global":
        return router_mass(Probe(model), batches)
    if method == "easy_ep":
        return easy_ep(Probe(model, easy_ep=True), batches)
    if method == "random":
        return np.random.default_rng(seed).random(
            (model.config.num_layers, model.config.routed_experts))
    raise subset_lib.SubsetError(f"unknown selection method {method!r}; valid: "
                                 f"{', '.join(METHODS)}")


def select(model, batches, keep: int, method: str = "layerwise", *, seed: int = 0,
           data: dict | None = None) -> subset_lib.Subset:
    """The subset of `keep` experts per layer (shared ones included) that `method` chooses.

    batches: calibration batches (emo_jax.modular.runtime); may be empty for 'random'.
    data: description of the calibration data, recorded in the subset.
    """
    config = model.config
    keep = subset_lib.check_keep(keep, config)
    if method not in METHODS:
        raise subset_lib.SubsetError(f"unknown selection method {method!r}; valid: "
                                     f"{', '.join(METHODS)}")
    count = keep - config.num_shared_experts
    data = dict(data or {})
    data["tokens"] = int(sum(np.count_nonzero(b["segment_ids"]) for b in batches))
    if method == "layerwise":
        kept, scores_LR = layerwise(Probe(model), batches, count)
    else:
        scores_LR = scores_for(method, model, batches, seed=seed)
        kept = [top_experts(s, count) for s in scores_LR]
    if method == "random":
        data["seed"] = seed
    return subset_lib.make_subset(kept, config=config, model=model, method=method, data=data,
                                  scores_LR=scores_LR)
