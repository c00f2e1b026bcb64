"""Held-out loss and perplexity of a checkpoint (also installed as `emo-eval`):

    python -m emo_jax.eval --checkpoint=WORKDIR_OR_MODEL --data=PATH [--by_domain] \\
        [--subset=subset.json] [--out=FILE.json] [--step=N] [--batch_size=N] [--seq_len=N] \\
        [--max_documents=N] [--request_log=FILE.jsonl]

PATH is any data spec (`emo_jax/data/sources.py`: JSONL, text files, ArrayRecord, tfds:...,
'' = the bundled eval split). The documents are packed into rows (no shuffle, every document
once), the model runs without document pools (as served: `moe.eval_pool`, default plain
top-k), and the loss is the mean next-token cross-entropy in nats per token over every
predicted token; perplexity = exp(loss). With --by_domain, the same per domain of the
documents' `domain` field (documents without one count under '(none)'). --request_log appends
one JSON line per document: how many routed assignments each expert of each layer made for its
tokens (format: emo_jax/modular/request_log.py).

`evaluate(model, config, docs, expert_mask_LR=...)` is the library function: a bool [L, R]
expert mask evaluates a subset of the experts (what `--subset=subset.json` passes: a subset
file of `python -m emo_jax.select` for this model, applied by masking).
This module reads checkpoints and data; it never writes a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, one of its "
                                  "checkpoints/<step> directories, or a model directory.")
_DATA = flags.DEFINE_string("data", None, "Data spec of the documents to evaluate "
                            "('' = the bundled eval split).")
_BY_DOMAIN = flags.DEFINE_bool("by_domain", False, "Also report each document domain.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per batch (default: data.batch_size, "
                              "rounded up to a multiple of the devices).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: data.seq_len).")
_MAX_DOCS = flags.DEFINE_integer("max_documents", None, "Evaluate at most this many documents.")
_SUBSET = flags.DEFINE_string("subset", None, "Subset file (python -m emo_jax.select): evaluate "
                              "only its experts, by masking the others.")
_REQUEST_LOG = flags.DEFINE_string("request_log", None, "Append which experts of each layer "
                                   "served each document to this JSONL file.")

NO_DOMAIN = "(none)"


def token_losses(model, batch, expert_mask_LR=None, assignments: bool = False):
    """(ce_BS, predicted_BS): float32 next-token cross-entropy and the mask of predicted tokens;
    with `assignments`, also the int32 [L, B, S, K] routed expert of every assignment (-1 =
    none)."""
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], pool_key=None,
                expert_mask_LR=expert_mask_LR, capture=("expert_idx",) if assignments else ())
    targets_BS, mask_BS = losses.next_token_targets(batch["tokens"], batch["segment_ids"])
    loss_BS, _ = losses.token_cross_entropy(out.logits_BSV, targets_BS)
    result = (loss_BS * mask_BS, mask_BS)
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
    from emo_jax.modular.request_log import DocumentCounter

    from emo_jax import parallel
    from emo_jax.data.pipeline import pack_documents
    from emo_jax.data.tokenizers import make_tokenizer
    from emo_jax.train.checkpoint import model_mesh

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
        return token_losses(nnx.merge(graphdef, params), batch, mask, assignments=routing)

    counter = DocumentCounter(config.model.num_layers,
                              config.moe.num_experts - config.moe.num_shared_experts)

    domains = [doc.get("domain") or NO_DOMAIN for doc in docs]
    ce_by, tokens_by = {}, {}
    rows = slice(jax.process_index() * (batch_size // jax.process_count()),
                 (jax.process_index() + 1) * (batch_size // jax.process_count()))
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        for batch in pack_documents(docs, tokenizer, seq_len, batch_size,
                                    packing=config.data.packing,
                                    packing_bins=config.data.packing_bins):
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


def main(argv):
    from emo_jax.config import ConfigError
    from emo_jax.data.sources import DataError, read_documents
    from emo_jax.cli import fail, initialize_distributed, quiet_logging
    from emo_jax.train.checkpoint import CheckpointError, restore_model

    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    try:
        initialize_distributed()
        model, config, metadata = restore_model(_CHECKPOINT.value, step=_STEP.value)
        mask = None
        if _SUBSET.value:
            from emo_jax.modular import subset as subset_lib

            subset = subset_lib.load(_SUBSET.value)
            subset.check_model(config, model, where=f"subset file '{_SUBSET.value}'")
            mask = subset.mask()
        docs = read_documents(_DATA.value, text_field=config.data.text_field,
                              max_documents=_MAX_DOCS.value)
        result = evaluate(model, config, docs, expert_mask_LR=mask, batch_size=_BATCH.value,
                          seq_len=_SEQ.value, routing=bool(_REQUEST_LOG.value))
        routing = result.pop("routing", None)
        if routing is not None and jax.process_index() == 0:
            from emo_jax.modular.request_log import RequestLog

            log = RequestLog(_REQUEST_LOG.value, tool="eval", checkpoint=_CHECKPOINT.value,
                             shared_experts=config.moe.num_shared_experts, subset=_SUBSET.value,
                             metadata=metadata)
            for doc in sorted(routing["counts"]):
                log.write(routing["counts"][doc], routing["tokens"][doc], document=doc,
                          domain=docs[doc].get("domain"))
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, OSError) as err:
        fail(str(err))
    result = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "step": metadata.get("step"),
              "data": _DATA.value, "subset": _SUBSET.value, **result}
    if not _BY_DOMAIN.value:
        result.pop("by_domain")
    if jax.process_index() == 0:
        print(f"all: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"tokens {result['tokens']}  documents {result['documents']}")
        for domain, r in result.get("by_domain", {}).items():
            print(f"{domain}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
                  f"tokens {r['tokens']}  documents {r['documents']}")
        if _OUT.value:
            os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
            with open(_OUT.value, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2, sort_keys=True)
    sys.stdout.flush()


def run():
    """Console-script entry point (`emo-eval`)."""
    from emo_jax.cli import parse_flags

    flags.mark_flags_as_required(["checkpoint", "data"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
