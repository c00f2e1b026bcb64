"""Expert subsets: which experts of every MoE layer a task keeps (`Subset`), made and combined.

The subset file itself (format, `Subset`, load / validate / save, refusal of another model's
subset) is emo_jax/subset_file.py; its names are imported here, so the modular tools reach
everything about subsets through this module. Here: `check_keep` (a valid K for a model),
`check_keep_total` (a valid total budget N), `make_subset` (a Subset of a model from kept ids per
layer) and `compose`.

`compose` is the per-layer union of subsets of one model. It keeps the composed model uniform
(one `moe.num_experts` for every layer, as the inputs of per-layer `--keep` selections are): a
layer whose union is smaller than the largest is filled up to it with its best-scoring remaining experts (mean of the inputs'
normalised scores; lowest ids when no scores are stored); the ids added are listed under
"filled". Nothing here touches a model: it reads and writes JSON and validates it.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from emo_jax.model.model_config import ModelConfig
# The file format; imported for this module's users too (subset_lib.load, .save, ...).
from emo_jax.subset_file import (FORMAT, FORMAT_VERSION, SHAPE_KEYS, Subset,  # noqa: F401
                                 SubsetError, dumps, from_json, load, model_shape,
                                 router_digest, save)


def check_keep(keep: int, config) -> int:
    """K must keep at least one routed expert and at most all experts."""
    model_config = ModelConfig.of(config)
    total, shared = model_config.num_experts, model_config.num_shared_experts
    if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or \
            not shared < keep <= total:
        raise SubsetError(
            f"K={keep} (--keep) is not valid for this model: K counts its {shared} shared "
            f"expert(s) and must keep at least one routed expert, so {shared + 1} <= K <= "
            f"{total} (the experts per layer)")
    return int(keep)


def check_keep_total(keep_total: int, config) -> int:
    """N experts in all (shared included) leaves every layer its shared experts and top_k
    routed ones, and cannot exceed the experts the model has."""
    model_config = ModelConfig.of(config)
    shared, layers = model_config.num_shared_experts, model_config.num_layers
    least = layers * (shared + model_config.top_k)
    most = sum(model_config.layer_experts)
    if not isinstance(keep_total, (int, np.integer)) or isinstance(keep_total, bool) or \
            not least <= keep_total <= most:
        raise SubsetError(
            f"N={keep_total} (--keep_total) is not valid for this model: it counts the experts "
            f"kept in all {layers} layers, shared ones included, and every layer keeps its "
            f"{shared} shared and at least top_k={model_config.top_k} routed experts, so "
            f"{least} <= N <= {most}")
    return int(keep_total)


def make_subset(kept_LK, *, config, model, method: str, data: dict, scores_LR=None) -> Subset:
    """A Subset of `model` from kept routed ids per layer (validated like a loaded file); the
    layers may keep different numbers (`keep` is then a list)."""
    layers = [sorted(int(i) for i in ids) for ids in kept_LK]
    shared = ModelConfig.of(config).num_shared_experts
    keeps = [shared + len(ids) for ids in layers]
    subset = Subset(
        layers=layers, keep=keeps[0] if len(set(keeps)) == 1 else keeps, shared_experts=shared,
        method=method,
        data=data,
        model={"shape": model_shape(config), "router_digest": router_digest(model)},
        scores=None if scores_LR is None else np.asarray(scores_LR, np.float64).tolist())
    return from_json(subset.to_json(), where="the new subset")


def _normalised(scores) -> np.ndarray:
    s_LR = np.maximum(np.asarray(scores, np.float64), 0.0)
    return s_LR / np.maximum(s_LR.sum(-1, keepdims=True), 1e-30)


def compose(subsets: list[Subset], *, names: list[str] | None = None) -> Subset:
    """The per-layer union of subsets of one model, filled to equal size (module docstring)."""
    if not subsets:
        raise SubsetError("compose needs at least one subset")
    names = names or [f"subset {i}" for i in range(len(subsets))]
    first = subsets[0]
    for s, name in zip(subsets[1:], names[1:]):
        if s.model.get("shape") != first.model.get("shape"):
            diff = [k for k in SHAPE_KEYS if s.model["shape"].get(k) != first.model["shape"][k]]
            raise SubsetError(f"cannot compose {names[0]} and {name}: they belong to models of "
                              f"different shapes ({', '.join(diff)})")
        if s.model.get("router_digest") != first.model.get("router_digest"):
            logging.warning("composing subsets of models with other router weights (%s, %s)",
                            names[0], name)
    routed = first.routed_experts
    have_scores = all(s.scores is not None for s in subsets)
    combined_LR = (np.mean([_normalised(s.scores) for s in subsets], axis=0) if have_scores
                   else np.zeros((first.num_layers, routed)))
    unions = [sorted(set().union(*(s.layers[layer] for s in subsets)))
              for layer in range(first.num_layers)]
    size = max(len(u) for u in unions)
    layers, filled = [], []
    for layer, union in enumerate(unions):
        # Best combined score first, ties by the lower id.
        order = np.lexsort((np.arange(routed), -combined_LR[layer]))
        present = set(union)
        extra = [int(e) for e in order if int(e) not in present][:size - len(union)]
        layers.append(sorted(union + extra))
        filled.append(sorted(extra))
    out = Subset(
        layers=layers, keep=first.shared_experts + size, shared_experts=first.shared_experts,
        method="compose",
        data={"composed_from": names},
        model=first.model,
        scores=combined_LR.tolist() if have_scores else None,
        components=[{"name": n, "method": s.method, "keep": s.keep, "data": s.data}
                    for s, n in zip(subsets, names)],
        filled=filled)
    return from_json(out.to_json(), where="the composed subset")
