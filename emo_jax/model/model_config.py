"""The model's own configuration: a frozen, typed view of the `model.*` and `moe.*` keys plus the
parameter layout (`mesh.rules`), built once from a run config.

Everything under `emo_jax/model/` takes a `ModelConfig` and nothing else, so the model does not
see training, data or checkpoint settings, and a jitted program keyed on it recompiles only when
the model itself changes. It is hashable (usable as a static argument and as a cache key).
Keys are defined, documented and validated in `emo_jax/config.py`; this class only reads them.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _section(name: str):
    return dataclasses.field(metadata={"section": name})


def expert_counts(experts_per_layer: str, num_experts: int, num_layers: int) -> tuple[int, ...]:
    """Experts of each layer, shared ones included, from `moe.experts_per_layer` ('' means
    num_experts in every layer). Raises ValueError on a count that is not an integer."""
    if not experts_per_layer:
        return (num_experts,) * num_layers
    return tuple(int(n) for n in experts_per_layer.split(","))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and compute settings of one EMO Transformer (meanings: emo_jax/config.py)."""

    vocab_size: int = _section("model")
    d_model: int = _section("model")
    num_layers: int = _section("model")
    num_heads: int = _section("model")
    num_kv_heads: int = _section("model")
    head_dim: int = _section("model")
    rope_theta: float = _section("model")
    norm_eps: float = _section("model")
    qk_norm: bool = _section("model")
    init_std: float = _section("model")
    init: str = _section("model")
    compute_dtype: str = _section("model")
    remat: str = _section("model")
    attention: str = _section("model")
    attention_chunk: int = _section("model")
    loss_chunk: int = _section("model")

    num_experts: int = _section("moe")
    num_shared_experts: int = _section("moe")
    top_k: int = _section("moe")
    expert_hidden: int = _section("moe")
    pool: str = _section("moe")
    pool_min: int = _section("moe")
    pool_max: int = _section("moe")
    eval_pool: int = _section("moe")
    grouped_matmul: str = _section("moe")
    block_size: int = _section("moe")
    dispatch: str = _section("moe")
    capacity_factor: float = _section("moe")
    blocked_chunk_blocks: int = _section("moe")
    experts_per_layer: str = _section("moe")

    # Logical parameter axis -> mesh axes ('' replicated, 'a,b' several), sorted: `mesh.rules`.
    sharding_rules: tuple[tuple[str, str], ...] = (("expert", "expert"),)

    @property
    def routed_experts(self) -> int:
        """R: experts chosen by the router (the shared ones excluded)."""
        return self.num_experts - self.num_shared_experts

    @property
    def layer_experts(self) -> tuple[int, ...]:
        """Experts of each layer, shared ones included: `experts_per_layer`, or num_experts in
        every layer when it is ''."""
        return expert_counts(self.experts_per_layer, self.num_experts, self.num_layers)

    @property
    def ragged(self) -> bool:
        """Layers keep different numbers of experts (the stacks are padded to num_experts)."""
        return len(set(self.layer_experts)) > 1

    def layer_routed(self) -> tuple[int, ...]:
        """Routed experts of each layer: r_l = layer_experts[l] - num_shared_experts."""
        return tuple(n - self.num_shared_experts for n in self.layer_experts)

    def existing_experts_LR(self):
        """bool numpy [L, R]: routed expert e exists in layer l (e < r_l); the rest of the
        padded stacks is zero and masked out of routing."""
        return np.arange(self.routed_experts)[None, :] < np.array(self.layer_routed())[:, None]

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        """The model settings of a run config (an ml_collections.ConfigDict)."""
        values = {}
        for field in dataclasses.fields(cls):
            section = field.metadata.get("section")
            if section is not None:
                values[field.name] = config[section][field.name]
        values["sharding_rules"] = tuple(sorted(
            (str(k), str(v)) for k, v in dict(config.mesh.rules).items()))
        return cls(**values)

    @classmethod
    def of(cls, config) -> "ModelConfig":
        """`config` itself if it is a ModelConfig, else the model settings of a run config."""
        return config if isinstance(config, cls) else cls.from_config(config)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
