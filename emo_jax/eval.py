"""Held-out loss and perplexity of a checkpoint (also installed as `emo-eval`):

    python -m emo_jax.eval --checkpoint=WORKDIR_OR_MODEL --data=PATH [--by_domain] \\
        [--subset=subset.json] [--out=FILE.json] [--step=N] [--batch_size=N] [--seq_len=N] \\
        [--max_documents=N] [--request_log=FILE.jsonl] [--eval_pool=N]

PATH is any data spec (`emo_jax/data/sources.py`: JSONL, text files, ArrayRecord, tfds:...,
'' = the bundled eval split). The documents are packed into rows (no shuffle, every document
once), the model runs without document pools (as served: `moe.eval_pool`, default plain
top-k; --eval_pool=32 evaluates as the reference does during training, with a fixed pool of 32
experts per segment), and the loss is the mean next-token cross-entropy in nats per token over every
predicted token; perplexity = exp(loss). With --by_domain, the same per domain of the
documents' `domain` field (documents without one count under '(none)'). --request_log appends
one JSON line per document: how many routed assignments each expert of each layer made for its
tokens (format: emo_jax/modular/request_log.py).

The library function is `emo_jax.evaluation.evaluate(model, config, docs, expert_mask_LR=...)`:
a bool [L, R] expert mask evaluates a subset of the experts (what `--subset=subset.json`
passes: a subset file of `python -m emo_jax.select` for this model, applied by masking).
This module reads checkpoints and data; it never writes a checkpoint. An existing --out file is
refused (one line, exit status 2) unless --overwrite is given.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags

from emo_jax import storage
from emo_jax.cli import (fail, initialize_distributed, parse_flags, quiet_logging,
                         refuse_existing_output, write_text_atomically)
from emo_jax.config import ConfigError
from emo_jax.data.sources import DataError, read_documents
from emo_jax.evaluation import evaluate, with_eval_pool
from emo_jax.model_files import CheckpointError, restore_model
from emo_jax.modular import subset as subset_lib
from emo_jax.modular.request_log import RequestLog

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, one of its "
                                  "checkpoints/<step> directories, or a model directory.")
_DATA = flags.DEFINE_string("data", None, "Data spec of the documents to evaluate "
                            "('' = the bundled eval split).")
_BY_DOMAIN = flags.DEFINE_bool("by_domain", False, "Also report each document domain.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per batch (default: data.batch_size, "
                              "rounded up to a multiple of the devices).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: data.seq_len).")
_MAX_DOCS = flags.DEFINE_integer("max_documents", None, "Evaluate at most this many documents.")
_SUBSET = flags.DEFINE_string("subset", None, "Subset file (python -m emo_jax.select): evaluate "
                              "only its experts, by masking the others.")
_EVAL_POOL = flags.DEFINE_integer(
    "eval_pool", None, "Fixed pool of this many experts per segment (moe.eval_pool; 0 = none, "
    "plain top-k as served; 32 = the reference's training-time evaluation). Default: the "
    "checkpoint's moe.eval_pool.")
_REQUEST_LOG = flags.DEFINE_string("request_log", None, "Append which experts of each layer "
                                   "served each document to this JSONL file.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    if _OUT.value:
        refuse_existing_output(_OUT.value, overwrite=_OVERWRITE.value)
    try:
        initialize_distributed()
        model, config, metadata = restore_model(_CHECKPOINT.value, step=_STEP.value)
        if _EVAL_POOL.value is not None:
            model, config = with_eval_pool(model, config, _EVAL_POOL.value)
        mask = None
        if _SUBSET.value:
            subset = subset_lib.load(_SUBSET.value)
            subset.check_model(config, model, where=f"subset file '{_SUBSET.value}'")
            mask = subset.mask()
        docs = read_documents(_DATA.value, text_field=config.data.text_field,
                              max_documents=_MAX_DOCS.value)
        result = evaluate(model, config, docs, expert_mask_LR=mask, batch_size=_BATCH.value,
                          seq_len=_SEQ.value, routing=bool(_REQUEST_LOG.value))
        routing = result.pop("routing", None)
        if routing is not None and jax.process_index() == 0:
            log = RequestLog(_REQUEST_LOG.value, tool="eval", checkpoint=_CHECKPOINT.value,
                             shared_experts=config.moe.num_shared_experts, subset=_SUBSET.value,
                             metadata=metadata)
            for doc in sorted(routing["counts"]):
                log.write(routing["counts"][doc], routing["tokens"][doc], document=doc,
                          domain=docs[doc].get("domain"))
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, OSError) as err:
        fail(str(err))
    result = {"checkpoint": storage.absolute(_CHECKPOINT.value), "step": metadata.get("step"),
              "data": _DATA.value, "subset": _SUBSET.value,
              "eval_pool": config.moe.eval_pool, **result}
    if not _BY_DOMAIN.value:
        result.pop("by_domain")
    if jax.process_index() == 0:
        print(f"all: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"tokens {result['tokens']}  documents {result['documents']}")
        for domain, r in result.get("by_domain", {}).items():
            print(f"{domain}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
                  f"tokens {r['tokens']}  documents {r['documents']}")
        if _OUT.value:
            write_text_atomically(_OUT.value, json.dumps(result, indent=2, sort_keys=True))
    sys.stdout.flush()


def run():
    """Console-script entry point (`emo-eval`)."""
    flags.mark_flags_as_required(["checkpoint", "data"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
