"""Physical pruning: a standalone smaller model holding only a subset's experts.

`extract(model, subset)` keeps, in every layer, the subset's routed experts (their SwiGLU weights
and their router columns, in ascending id order) and every shared expert; everything else
(attention, norms, embeddings, head) is copied. The config becomes `moe.num_experts = K` and
`moe.top_k = min(top_k, K - S)`. A subset keeping K_l experts in layer l (`select
--keep_total`) gives `moe.num_experts = max K_l`, `moe.experts_per_layer = 'K_0,K_1,...'`
(layer l's experts at rows 0..K_l - S - 1 of the stacks, zeros after them, masked out of
routing) and `moe.top_k = min(top_k, min K_l - S)`. Because the removed router columns are gone, the router softmax
renormalises over the kept experts: the small model computes exactly what the full model computes
with `expert_mask_LR = subset.mask()` (tested to float32 tolerance), while its parameters really
shrink by the removed experts' share.

The result is a plain model: `save_model` writes it as a standalone checkpoint that
restore_model, eval, generate, select and training (`--init_checkpoint`) read like any other.
If `mesh.expert` no longer divides the routed experts, it is reset to 1 (a layout, not a shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from emo_jax.config import routed_experts, validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer
from emo_jax.modular import subset as subset_lib

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # [L, R, ...]: routed expert axis 1


def param_stats(model) -> dict:
    """{'params': count, 'bytes': bytes} of every parameter of a model."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {"params": int(sum(x.size for x in leaves)),
            "bytes": int(sum(x.size * x.dtype.itemsize for x in leaves))}


def extracted_config(config, keep) -> ml_collections.ConfigDict:
    """A copy of `config` for the model keeping `keep` experts per layer (K, or a list of K_l,
    shared experts included)."""
    layers = config.model.num_layers
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * layers
    if len(keeps) != layers:
        raise subset_lib.SubsetError(f"a keep per layer needs {layers} counts, got {keeps}")
    keeps = [subset_lib.check_keep(k, config) for k in keeps]
    out = ml_collections.ConfigDict(config.to_dict())
    shared = out.moe.num_shared_experts
    out.moe.num_experts = max(keeps)
    out.moe.experts_per_layer = "" if len(set(keeps)) == 1 else ",".join(map(str, keeps))
    out.moe.top_k = min(out.moe.top_k, min(keeps) - shared)
    if (max(keeps) - shared) % max(out.mesh.expert, 1):
        logging.warning("mesh.expert=%d does not divide the %d routed experts kept; the "
                        "extracted config uses mesh.expert=1", out.mesh.expert,
                        max(keeps) - shared)
        out.mesh.expert = 1
    return validate(out)


def extract_report(config, small_config, subset, before: dict, after: dict) -> dict:
    """What extraction did: params/bytes before and after, experts and top_k per layer."""
    routed = routed_experts(config)
    kept = subset.keep_per_layer
    uniform = len(set(kept)) == 1
    return {
        "params_before": before["params"], "params_after": after["params"],
        "bytes_before": before["bytes"], "bytes_after": after["bytes"],
        "num_experts_before": config.moe.num_experts,
        "num_experts_after": kept[0] if uniform else kept,
        "routed_experts_removed_per_layer": (
            routed - len(subset.layers[0]) if uniform
            else [routed - len(ids) for ids in subset.layers]),
        "top_k_before": config.moe.top_k, "top_k_after": small_config.moe.top_k,
    }


def extract(model, config, subset: subset_lib.Subset):
    """(small model, its config, report): the model (of run config `config`) restricted to the
    subset's experts.

    report: params/bytes before and after, the experts kept per layer, and the removed share.
    """
    subset.check_model(config, model)
    small_config = extracted_config(config, subset.keep_per_layer)
    idx_np, valid_np = subset.padded_ids()
    idx_LK, valid_LK = jnp.asarray(idx_np, jnp.int32), jnp.asarray(valid_np)
    pure = nnx.to_pure_dict(nnx.state(model))
    moe = pure["blocks"]["moe"]
    layers = jnp.arange(idx_LK.shape[0])[:, None]
    for name in _EXPERT_WEIGHTS:
        moe[name] = moe[name][layers, idx_LK] * valid_LK[:, :, None, None]
    moe["router"] = (jnp.take_along_axis(moe["router"], idx_LK[:, None, :], axis=2)
                     * valid_LK[:, None, :])

    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(ModelConfig.from_config(small_config), rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, pure)
    small = nnx.merge(graphdef, state)
    report = extract_report(config, small_config, subset, param_stats(model), param_stats(small))
    return small, small_config, report


def format_report(report: dict) -> str:
    """Two lines: parameters and bytes before -> after."""
    def gib(n):
        return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"

    share = 1 - report["params_after"] / max(report["params_before"], 1)
    after = report["num_experts_after"]
    after = ",".join(map(str, after)) if isinstance(after, list) else after
    return (f"parameters: {report['params_before']:,} -> {report['params_after']:,} "
            f"({share:.1%} removed); experts per layer {report['num_experts_before']} -> "
            f"{after}, top_k {report['top_k_before']} -> "
            f"{report['top_k_after']}\n"
            f"bytes: {report['bytes_before']:,} ({gib(report['bytes_before'])}) -> "
            f"{report['bytes_after']:,} ({gib(report['bytes_after'])})")
