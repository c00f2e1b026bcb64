"""Parameter counts and training FLOPs of a config, by abstract evaluation (nothing allocated).

Definitions:
  total_params     every parameter (embedding and output head included).
  embedding_params the token embedding and the output head (both [V, D]; untied).
  active_params    non-embedding parameters one token touches: attention, norms, router, the
                   top_k routed experts and the shared experts (with their own router when
                   there are two or more) of every layer.
  flops_per_token  training FLOPs per token (forward + backward):
                     6 * (active_params + head_params) + 6 * num_layers * num_heads * head_dim * seq_len
                   The first term counts every matmul weight a token uses, 2 FLOPs per multiply-add,
                   x3 for the backward pass; the second is causal attention (QK^T and AV: 4 * S * H * Dh
                   forward for full attention, halved by causality, x3 for the backward pass).
                   The embedding lookup is a gather and costs no FLOPs.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def summarize(config: ModelConfig, seq_len: int) -> dict:
    """Figures of a model trained on rows of `seq_len` tokens: parameter counts, FLOPs, bytes
    (float32)."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    m = e = config
    blocks = params["blocks"]
    moe = blocks["moe"]
    routed = config.routed_experts
    total = _count(params)
    embedding = _count(params["embed"]) + _count(params["head"])
    head = _count(params["head"])
    expert_params = _count([moe["w_gate"], moe["w_up"], moe["w_down"]])
    per_routed_expert = expert_params // (routed * m.num_layers)
    non_embedding = total - embedding
    active = non_embedding - expert_params + per_routed_expert * e.top_k * m.num_layers
    flops = (6 * (active + head)
             + 6 * m.num_layers * m.num_heads * m.head_dim * seq_len)
    return {
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": non_embedding,
        "active_params": active,
        "routed_expert_params": expert_params,
        "params_per_expert": per_routed_expert,
        "flops_per_token": flops,
        "param_bytes_float32": 4 * total,
        "adam_state_bytes_float32": 8 * total,
        "num_layers": m.num_layers,
        "num_experts": e.num_experts,
        "routed_experts": routed,
        "top_k": e.top_k,
    }
