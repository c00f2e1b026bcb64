"""Choose the experts a task needs, or compose subsets (also installed as `emo-select`):

    python -m emo_jax.select --checkpoint=DIR (--data=PATH | --text="...") --keep=K \\
        [--method=layerwise|global|easy_ep|random] [--max_docs=N] [--seed=S] --out=subset.json
    python -m emo_jax.select --checkpoint=DIR --data=PATH --keep_total=N --method=global \\
        --out=subset.json
    python -m emo_jax.select --compose a.json b.json [...] --out=ab.json

An existing --out file is refused (one line, exit status 2) unless --overwrite is given; the file
is written atomically (a temporary file renamed into place).

K counts the shared experts (16 of 128 = 12.5%). The calibration text (a data spec: JSONL, a
text file, a folder...; or one literal --text, e.g. a few-shot prompt) is run through the model
and every layer keeps its K - S best routed experts (emo_jax/modular/select.py explains the
methods; 'layerwise' is the reference). --compose writes the per-layer union of subsets of one
model. --keep_total=N instead of --keep chooses N experts in all layers together (shared ones
included; methods global, easy_ep, random): each layer keeps its top_k best routed experts and
the rest of the budget goes to the best scores of the whole model, so layers keep different
numbers; extracting such a subset gives a model with `moe.experts_per_layer`. The subset file
format: emo_jax/modular/subset.py. Use it with `emo_jax.eval --subset`,
`emo_jax.extract`, `emo_jax.generate --subset`.
"""

from __future__ import annotations

import os

from absl import app, flags

from emo_jax import storage
from emo_jax.cli import fail, parse_flags, quiet_logging, refuse_existing_output
from emo_jax.config import ConfigError
from emo_jax.model_files import CheckpointError
from emo_jax.modular import runtime, select, subset as subset_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints/<step> "
                                  "directory or model directory.")
_DATA = flags.DEFINE_string("data", None, "Calibration documents: a data spec (JSONL, text "
                            "file, folder, ...).")
_TEXT = flags.DEFINE_string("text", None, "Calibration text given literally (instead of --data).")
_KEEP = flags.DEFINE_integer("keep", None, "K: experts kept per layer, shared ones included.")
_KEEP_TOTAL = flags.DEFINE_integer("keep_total", None, "N: experts kept in all layers together, "
                                   "shared ones included (instead of --keep; the per-layer "
                                   "counts are chosen too).")
_METHOD = flags.DEFINE_enum("method", "layerwise", ["layerwise", "global", "easy_ep", "random"],
                            "How experts are scored.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", None, "Use at most this many documents of --data.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --method=random.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per calibration batch.")
_OUT = flags.DEFINE_string("out", None, "Subset file to write (JSON).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file (without "
                               "it, an existing file is refused).")
_COMPOSE = flags.DEFINE_bool("compose", False, "Compose the subset files given as arguments "
                             "(per-layer union) instead of selecting.")


def _summary(subset, out: str) -> str:
    if isinstance(subset.keep, list):
        return (f"kept {sum(subset.keep)} experts in {subset.num_layers} layers (per layer "
                f"{','.join(map(str, subset.keep))}, {subset.shared_experts} shared each), "
                f"method {subset.method} -> {out}")
    routed = subset.keep - subset.shared_experts
    return (f"kept {subset.keep} of {subset.model['shape']['moe.num_experts']} experts per layer "
            f"({subset.shared_experts} shared + {routed} routed) in {subset.num_layers} layers, "
            f"method {subset.method} -> {out}")


def compose_files(paths: list[str], out: str) -> str:
    if len(paths) < 2:
        fail("--compose needs at least two subset files, e.g. "
             "--compose a.json b.json --out=ab.json")
    subsets = [subset_lib.load(p) for p in paths]
    composed = subset_lib.compose(subsets, names=[os.path.basename(p) for p in paths])
    subset_lib.save(composed, out)
    added = sum(len(f) for f in composed.filled)
    return _summary(composed, out) + (f" ({added} experts added to even out the layers)"
                                      if added else "")


def select_file(out: str) -> str:
    if (_KEEP.value is None) == (_KEEP_TOTAL.value is None):
        fail("give --keep=K (experts kept per layer, shared ones included) or --keep_total=N "
             "(experts kept in all layers), one of them")
    if _DATA.value is not None and _TEXT.value is not None:
        fail("give --data or --text, not both")
    model, config, _ = runtime.load_model(_CHECKPOINT.value)
    if _KEEP_TOTAL.value is None:
        subset_lib.check_keep(_KEEP.value, config)
    else:
        subset_lib.check_keep_total(_KEEP_TOTAL.value, config)
    if _METHOD.value == "random" and _DATA.value is None and _TEXT.value is None:
        docs, data = [], {}
    else:
        docs, data = runtime.read_texts(config, data=_DATA.value, text=_TEXT.value,
                                        max_docs=_MAX_DOCS.value)
    batches = runtime.document_batches(docs, runtime.tokenizer_of(config), config.data.seq_len,
                                       _BATCH.value, config.data.boundary) if docs else []
    subset = select.select(model, batches, _KEEP.value, _METHOD.value, seed=_SEED.value,
                           data=data, keep_total=_KEEP_TOTAL.value)
    subset.model["checkpoint"] = storage.absolute(_CHECKPOINT.value)
    subset_lib.save(subset, out)
    return _summary(subset, out) + f" from {subset.data['tokens']} tokens"


def main(argv):
    quiet_logging()
    if not _OUT.value:
        fail("--out=FILE.json is required: where the subset is written")
    if not _COMPOSE.value and len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (subset files go with --compose)")
    if not _COMPOSE.value and not _CHECKPOINT.value:
        fail("--checkpoint is required (or --compose a.json b.json)")
    refuse_existing_output(_OUT.value, overwrite=_OVERWRITE.value)
    try:
        print(compose_files(argv[1:], _OUT.value) if _COMPOSE.value else select_file(_OUT.value))
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))


def run():
    """Console-script entry point (`emo-select`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
