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

Under a total budget (`keep_total` = N experts over all layers, shared ones included, instead
of K per layer; one-pass methods) the layers keep different numbers: every layer keeps its
top_k best routed experts (so top_k still routes), and the rest of the budget goes to the best
remaining (layer, expert) scores of the whole model (ties: lower layer, then lower id). Router
mass and Easy-EP scores are per-token shares in every layer, so they compare across layers.

In a model whose layers already keep different numbers of experts (`moe.experts_per_layer`),
only the experts a layer has are ever chosen.

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


def _existing(scores_LR, config) -> np.ndarray:
    """Scores with the padding of a model with per-layer expert counts at -inf."""
    return np.where(config.existing_experts_LR(), np.asarray(scores_LR, np.float64), -np.inf)


def under_budget(scores_LR, keep_total: int, config) -> list[list[int]]:
    """Kept routed ids per layer for `keep_total` experts in all (module docstring)."""
    keep_total = subset_lib.check_keep_total(keep_total, config)
    scores_LR = _existing(scores_LR, config)
    layers, routed = scores_LR.shape
    kept = [set(top_experts(scores_LR[layer], config.top_k)) for layer in range(layers)]
    rest = keep_total - layers * (config.num_shared_experts + config.top_k)
    layer_ER, expert_ER = np.meshgrid(np.arange(layers), np.arange(routed), indexing="ij")
    order = np.lexsort((expert_ER.ravel(), layer_ER.ravel(), -scores_LR.ravel()))
    for flat in order:
        if rest == 0:
            break
        layer, expert = divmod(int(flat), routed)
        if expert not in kept[layer] and np.isfinite(scores_LR[layer, expert]):
            kept[layer].add(expert)
            rest -= 1
    return [sorted(ids) for ids in kept]


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
    mask_LR = probe.config.existing_experts_LR().copy()
    scores_LR = np.zeros((layers, routed))
    kept = []
    for layer in range(layers):
        scores_LR[layer] = router_mass(probe, batches, mask_LR)[layer]
        kept.append(top_experts(_existing(scores_LR, probe.config)[layer], count))
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


def select(model, batches, keep: int | None, method: str = "layerwise", *, seed: int = 0,
           data: dict | None = None, keep_total: int | None = None) -> subset_lib.Subset:
    """The subset of `keep` experts per layer (shared ones included) that `method` chooses, or
    of `keep_total` experts in all, per-layer counts chosen too (module docstring).

    batches: calibration batches (emo_jax.modular.runtime); may be empty for 'random'.
    data: description of the calibration data, recorded in the subset.
    """
    config = model.config
    if (keep is None) == (keep_total is None):
        raise subset_lib.SubsetError("give the experts kept per layer (--keep) or in all "
                                     "(--keep_total), one of them")
    if method not in METHODS:
        raise subset_lib.SubsetError(f"unknown selection method {method!r}; valid: "
                                     f"{', '.join(METHODS)}")
    if keep_total is not None and method == "layerwise":
        raise subset_lib.SubsetError("--keep_total needs a one-pass method (global, easy_ep, "
                                     "random); layerwise chooses a fixed count layer by layer")
    if keep is not None:
        count = subset_lib.check_keep(keep, config) - config.num_shared_experts
    data = dict(data or {})
    data["tokens"] = int(sum(np.count_nonzero(b["segment_ids"]) for b in batches))
    if method == "layerwise":
        kept, scores_LR = layerwise(Probe(model), batches, count)
    else:
        scores_LR = scores_for(method, model, batches, seed=seed)
        if keep_total is not None:
            kept = under_budget(scores_LR, keep_total, config)
            data["keep_total"] = int(keep_total)
        else:
            kept = [top_experts(s, count) for s in _existing(scores_LR, config)]
    if method == "random":
        data["seed"] = seed
    return subset_lib.make_subset(kept, config=config, model=model, method=method, data=data,
                                  scores_LR=scores_LR)
