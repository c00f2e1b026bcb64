"""Held-out evaluation of a model: per-token losses from the model's forward, and loss and
perplexity over documents, overall and per domain (what `python -m emo_jax.eval` prints).

The documents are packed into rows (no shuffle, every document once), the model runs without
document pools (as served: `moe.eval_pool`, default plain top-k), and the loss is the mean
next-token cross-entropy in nats per token over every predicted token; perplexity = exp(loss).
A bool [L, R] expert mask evaluates a subset of the experts by masking.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax import parallel
from emo_jax.config import routed_experts, validate
from emo_jax.data import packing
from emo_jax.data.pipeline import pack_documents
from emo_jax.data.tokenizers import make_tokenizer
from emo_jax.model import losses
from emo_jax.model_files import model_mesh
from emo_jax.modular.request_log import DocumentCounter

NO_DOMAIN = "(none)"


def with_eval_pool(model, config, eval_pool: int):
    """(model, config) evaluating with a fixed pool of `eval_pool` experts per segment
    (`moe.eval_pool`; 0 = none, plain top-k as the model is served). 32 reproduces the
    reference's training-time evaluation (docs/METHOD.md section 6). Sets the model's own
    setting in place; the config returned is a validated copy."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.moe.eval_pool = int(eval_pool)
    validate(config)
    model.config = model.config.replace(eval_pool=int(eval_pool))
    return model, config


def token_losses(model, batch, expert_mask_LR=None, assignments: bool = False,
                 opening_eos: int | None = None):
    """(ce_BS, predicted_BS): float32 next-token cross-entropy and the mask of predicted tokens;
    with `assignments`, also the int32 [L, B, S, K] routed expert of every assignment (-1 =
    none). `opening_eos`: `packing.opening_eos(config)` (which positions are predicted)."""
    targets_BS, mask_BS = losses.next_token_targets(batch["tokens"], batch["segment_ids"],
                                                    opening_eos)
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], pool_key=None,
                expert_mask_LR=expert_mask_LR, capture=("expert_idx",) if assignments else (),
                targets_BS=targets_BS)
    result = (out.token_loss_BS * mask_BS, mask_BS)
    return result + (out.captured["expert_idx_BSK"],) if assignments else result


def _summary(ce: float, tokens: float, documents: int) -> dict:
    loss = ce / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan"),
            "tokens": int(tokens), "documents": documents}


def evaluate(model, config, docs: list[dict], *, expert_mask_LR=None, batch_size=None,
             seq_len=None, routing: bool = False) -> dict:
    """Loss and perplexity over `docs` ({'text', 'domain'?} dicts), overall and per domain.

    The model's parameters must live on one mesh (as `restore_model` places them). Returns
    {'loss', 'perplexity', 'tokens', 'documents', 'by_domain': {domain: same keys}}; with
    `routing`, also 'routing': {'counts': {document index: int64 [L, R] routed assignments
    per layer and expert}, 'tokens': {document index: real tokens}} (request logs).
    """
    mesh = model_mesh(model)
    shards = parallel.batch_shards(mesh)
    batch_size = batch_size or config.data.batch_size
    batch_size = -(-batch_size // shards) * shards
    seq_len = seq_len or config.data.seq_len
    tokenizer = make_tokenizer(config.data.tokenizer)
    graphdef, params = nnx.split(model)
    mask = None if expert_mask_LR is None else jnp.asarray(expert_mask_LR, bool)

    @jax.jit
    def step(params, batch, mask):
        return token_losses(nnx.merge(graphdef, params), batch, mask, assignments=routing,
                            opening_eos=packing.opening_eos(config))

    counter = DocumentCounter(config.model.num_layers, routed_experts(config))

    domains = [doc.get("domain") or NO_DOMAIN for doc in docs]
    ce_by, tokens_by = {}, {}
    rows = parallel.process_rows(mesh, batch_size)
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        for batch in pack_documents(docs, tokenizer, seq_len, batch_size,
                                    packing=config.data.packing,
                                    packing_bins=config.data.packing_bins,
                                    boundary=config.data.boundary):
            doc_ids = np.asarray(batch.pop("document_ids"))
            host = {k: np.asarray(v)[rows] for k, v in batch.items()}
            ce, predicted, *idx = step(params, parallel.host_to_global(host, mesh), mask)
            if routing:
                counter.add(jax.device_get(jax.device_put(idx[0], replicated)), doc_ids)
            ce = np.asarray(jax.device_get(jax.device_put(ce, replicated)), np.float64)
            predicted = np.asarray(jax.device_get(jax.device_put(predicted, replicated)))
            for doc in np.unique(doc_ids[predicted]):
                where = predicted & (doc_ids == doc)
                d = domains[int(doc)]
                ce_by[d] = ce_by.get(d, 0.0) + float(ce[where].sum())
                tokens_by[d] = tokens_by.get(d, 0.0) + float(where.sum())
    docs_by = {}
    for d in domains:
        docs_by[d] = docs_by.get(d, 0) + 1
    out = _summary(sum(ce_by.values()), sum(tokens_by.values()), len(docs))
    out["by_domain"] = {d: _summary(ce_by.get(d, 0.0), tokens_by.get(d, 0.0), docs_by[d])
                        for d in sorted(docs_by)}
    if routing:
        out["routing"] = {"counts": counter.counts, "tokens": counter.tokens}
    return out
