"""Which experts serve which domains (also installed as `emo-analyze`):

    python -m emo_jax.analyze --checkpoint=DIR --data=PATH --out=DIR [--clusters=32] \\
        [--keep=K] [--first_tokens=100] [--pca_dims=50] [--doc_clusters=K] \\
        [--doc_tokens=N] [--max_docs=N] [--seed=0]

Writes per-layer domain x expert usage heat maps, the Jaccard overlap of the subsets each
domain would select, the clustering of router distributions per token and per document (each
document's mean over its tokens) with purity and NMI against the documents' `domain` labels,
analysis.json and a report.md embedding the pictures (emo_jax/modular/analysis.py says exactly
what each is). An existing non-empty --out directory is refused (one line, exit status 2)
unless --overwrite is given; the results are written into a hidden sibling directory that
replaces --out only when complete, so a failed or interrupted run leaves the old one.
"""

from __future__ import annotations


from absl import app, flags

from emo_jax import storage
from emo_jax.cli import (directory_written_atomically, fail, parse_flags, quiet_logging,
                         refuse_existing_output)
from emo_jax.config import ConfigError
from emo_jax.model_files import CheckpointError
from emo_jax.modular import analysis, runtime

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints/<step> "
                                  "directory or model directory.")
_DATA = flags.DEFINE_string("data", None, "Documents to analyse (a data spec; JSONL with a "
                            "`domain` field gives the per-domain results).")
_OUT = flags.DEFINE_string("out", None, "Directory for the pictures, analysis.json and report.md.")
_CLUSTERS = flags.DEFINE_integer("clusters", 32, "k of the spherical k-means of tokens.")
_KEEP = flags.DEFINE_integer("keep", None, "K of the per-domain subsets compared by Jaccard "
                             "overlap (default: a quarter of the experts).")
_FIRST = flags.DEFINE_integer("first_tokens", 100, "Tokens clustered from the start of each "
                              "document.")
_PCA = flags.DEFINE_integer("pca_dims", 50, "PCA dimensions before clustering (both levels).")
_DOC_CLUSTERS = flags.DEFINE_integer("doc_clusters", None, "k of the spherical k-means of "
                                     "documents (default: the number of domains).")
_DOC_TOKENS = flags.DEFINE_integer("doc_tokens", None, "Tokens from the start of each document "
                                   "averaged into its document-level feature (default: the "
                                   "model's data.seq_len).")
_MAX_DOCS = flags.DEFINE_integer("max_docs", None, "Analyse at most this many documents.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the clustering.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out "
                               "directory (without it, one is refused).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    for name, value, low in (("clusters", _CLUSTERS.value, 1), ("first_tokens", _FIRST.value, 1),
                             ("pca_dims", _PCA.value, 1), ("doc_clusters", _DOC_CLUSTERS.value, 1),
                             ("doc_tokens", _DOC_TOKENS.value, 1)):
        if value is not None and value < low:
            fail(f"--{name}={value}: it must be >= {low}")
    refuse_existing_output(_OUT.value, overwrite=_OVERWRITE.value, directory=True)
    try:
        model, config, _ = runtime.load_model(_CHECKPOINT.value)
        docs, _ = runtime.read_texts(config, data=_DATA.value, max_docs=_MAX_DOCS.value)
        with directory_written_atomically(_OUT.value) as work:
            summary = analysis.analyze(model, config, docs, work, clusters=_CLUSTERS.value,
                                       keep=_KEEP.value, first_tokens=_FIRST.value,
                                       pca_dims=_PCA.value, doc_clusters=_DOC_CLUSTERS.value,
                                       doc_tokens=_DOC_TOKENS.value, seed=_SEED.value,
                                       source=_DATA.value)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    print(f"{summary['documents']} documents, {len(summary['domains'])} domains; "
          f"{summary['clusters']} clusters of {summary['cluster_tokens']} tokens: "
          f"{_scores(summary, '')}; {summary['doc_clusters']} clusters of "
          f"{summary['cluster_documents']} documents: {_scores(summary, 'doc_')}")
    print(f"wrote {storage.join(storage.absolute(_OUT.value), 'report.md')}")


def _scores(summary: dict, prefix: str) -> str:
    """One level's purity and NMI (summary keys `prefix` + name) for the console."""
    if prefix + "purity" not in summary:
        return "no domain labels: purity/NMI not computed"
    return (f"purity {summary[prefix + 'purity']:.3f}, NMI {summary[prefix + 'nmi']:.3f} "
            f"(shuffled: {summary[prefix + 'purity_shuffled']:.3f}, "
            f"{summary[prefix + 'nmi_shuffled']:.3f})")


def run():
    """Console-script entry point (`emo-analyze`)."""
    flags.mark_flags_as_required(["checkpoint", "data", "out"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
