"""The paper's headline in miniature: EMO keeps its quality with 25% / 12.5% of the experts, a
standard MoE does not (docs/METHOD.md §8; measured results: docs/RESULTS.md §1).

    python bench/replicate.py --out=runs/replicate [--config=configs/small.py] [--steps=1000] \\
        [--train_data=corpus.jsonl.gz --eval_data=heldout.jsonl.gz] [--select_docs=1] \\
        [--config.train.lr=... (any training config override, applied to both models)]

1. Trains two models with the training CLI, identical except `moe.pool='document'` (EMO) vs
   'none' (standard MoE); same data, seed and token budget. An existing run resumes / is reused.
2. For each domain of the held-out data: selects a subset (layerwise, the reference method) from
   `--select_docs` training documents of that domain (default ONE), extracts it (physically
   smaller model), and evaluates the held-out loss of that domain. Controls: a random subset of
   the same size (evaluated by masking, which computes exactly what extraction does), and the
   full model.
3. Writes `replicate.json`, `replicate.md` (table) and `replicate.png` (loss increase against
   the fraction of experts kept) into --out, plus the `analyze` report of each model.

Any JSONL corpus with `text` and `domain` fields works (gzip too); nothing here is tuned to the
bundled one. `--smoke` runs a few steps on two domains (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from emo_jax.data import read_documents
from emo_jax.evaluation import evaluate
from emo_jax.modular import runtime
from emo_jax.modular.analysis import analyze
from emo_jax.modular.extract import extract
from emo_jax.modular.select import select

VARIANTS = {"emo": "document", "standard": "none"}


def train(args, variant: str) -> str:
    workdir = os.path.join(args.out, variant)
    cmd = [sys.executable, "-m", "emo_jax.train", f"--config={args.config}",
           f"--workdir={workdir}", f"--config.train.steps={args.steps}",
           f"--config.moe.pool={VARIANTS[variant]}",
           f"--config.data.train_sources={args.train_data}",
           f"--config.data.eval_sources={args.eval_data}", *args.override]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return workdir


def by_domain(docs):
    out = {}
    for doc in docs:
        out.setdefault(doc.get("domain") or "(none)", []).append(doc)
    return out


def fraction_to_keep(fraction: float, config) -> int:
    e = config.moe
    return max(e.num_shared_experts + 1, int(round(fraction * e.num_experts)))


def measure(variant, workdir, args, train_by, eval_by, domains):
    model, config, _ = runtime.load_model(workdir)
    tokenizer = runtime.tokenizer_of(config)
    rng = np.random.default_rng(args.seed)
    rows = []
    for domain in domains:
        eval_docs = eval_by[domain][:args.max_eval_docs]
        full = evaluate(model, config, eval_docs)["loss"]
        pick = rng.choice(len(train_by[domain]), size=min(args.select_docs, len(train_by[domain])),
                          replace=False)
        calib = [train_by[domain][i] for i in pick]
        batches = runtime.document_batches(calib, tokenizer, config.data.seq_len,
                                           boundary=config.data.boundary)
        for fraction in args.fractions:
            keep = fraction_to_keep(fraction, config)
            subset = select(model, batches, keep, "layerwise", data={"documents": len(calib)})
            small, small_config, report = extract(model, config, subset)
            chosen = evaluate(small, small_config, eval_docs)["loss"]
            random_subset = select(model, [], keep, "random", seed=args.seed)
            rand = evaluate(model, config, eval_docs, expert_mask_LR=random_subset.mask())["loss"]
            rows.append({"model": variant, "domain": domain, "fraction": fraction, "keep": keep,
                         "full": full, "chosen": chosen, "random": rand,
                         "chosen_increase": chosen - full, "random_increase": rand - full,
                         "bytes_kept": report["bytes_after"] / report["bytes_before"]})
            print(f"{variant:8s} {domain:10s} keep {keep:3d}: full {full:.3f} "
                  f"chosen {chosen:.3f} (+{chosen - full:.3f}) random {rand:.3f}", flush=True)
    return rows


def analyse(variant, workdir, args, eval_by, domains):
    """The analyze report of one model (heat maps, subset overlap, router clusters of tokens and
    of documents)."""
    model, _, _ = runtime.load_model(workdir)
    docs = [d for dom in domains for d in eval_by[dom][:args.max_eval_docs]]
    return analyze(model, docs, os.path.join(args.out, f"analysis_{variant}"),
                   clusters=args.clusters, source=args.eval_data or "bundled:eval")


def summarise(rows, fractions):
    table = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["model"] == variant]
        if not mine:
            continue
        table[variant] = {"full": float(np.mean([r["full"] for r in mine]))}
        for f in fractions:
            sel = [r for r in mine if r["fraction"] == f]
            table[variant][f"chosen_{f}"] = float(np.mean([r["chosen_increase"] for r in sel]))
            table[variant][f"random_{f}"] = float(np.mean([r["random_increase"] for r in sel]))
    return table


def write_markdown(path, rows, table, fractions, args, seconds):
    lines = [f"Command: `python bench/replicate.py {' '.join(sys.argv[1:])}`  ",
             f"Wall time: {seconds / 60:.1f} min. Loss in nats per token on held-out documents.",
             "", "| model | full | " + " | ".join(
                 f"+chosen {f:.1%} | +random {f:.1%}" for f in fractions) + " |",
             "|---|---|" + "---|---|" * len(fractions)]
    for variant, t in table.items():
        lines.append(f"| {variant} | {t['full']:.3f} | " + " | ".join(
            f"{t[f'chosen_{f}']:+.3f} | {t[f'random_{f}']:+.3f}" for f in fractions) + " |")
    lines += ["", "Per domain (loss increase of the chosen subset over the full model):", "",
              "| domain | model | full | " + " | ".join(f"{f:.1%}" for f in fractions) + " |",
              "|---|---|---|" + "---|" * len(fractions)]
    for domain in sorted({r["domain"] for r in rows}):
        for variant in VARIANTS:
            sel = [r for r in rows if r["domain"] == domain and r["model"] == variant]
            if sel:
                lines.append(f"| {domain} | {variant} | {sel[0]['full']:.3f} | " + " | ".join(
                    f"{r['chosen_increase']:+.3f}" for r in sel) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, table, fractions):
    # Deferred: matplotlib is heavy to import, and its backend must be chosen before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [1.0] + list(fractions)
    for variant, t in table.items():
        ax.plot(xs, [0.0] + [t[f"chosen_{f}"] for f in fractions], "o-", label=f"{variant} (chosen)")
        ax.plot(xs, [0.0] + [t[f"random_{f}"] for f in fractions], "x--", alpha=0.6,
                label=f"{variant} (random)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:.1%}" for x in xs])
    ax.set_xlabel("fraction of experts kept")
    ax.set_ylabel("held-out loss increase (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the two runs and the results")
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--train_data", default="", help="training data spec ('' = bundled corpus)")
    p.add_argument("--eval_data", default="", help="held-out data spec ('' = bundled eval split)")
    p.add_argument("--fractions", default="0.25,0.125")
    p.add_argument("--select_docs", type=int, default=1, help="training docs that choose a subset")
    p.add_argument("--max_eval_docs", type=int, default=64)
    p.add_argument("--domains", default="", help="comma-separated domains (default: all)")
    p.add_argument("--clusters", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_analysis", action="store_true", help="skip the analyze reports")
    p.add_argument("--smoke", action="store_true", help="a few steps, two domains (CI)")
    args, extra = p.parse_known_args()  # --config.x=y flags go to both training runs
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.override = extra
    args.fractions = [float(f) for f in args.fractions.split(",")]
    if args.smoke:
        args.override = ["--config.train.eval_every=0", "--config.checkpoint.every=1000",
                         *args.override]
    start = time.time()
    os.makedirs(args.out, exist_ok=True)

    train_by = by_domain(read_documents(args.train_data or "bundled:train"))
    eval_by = by_domain(read_documents(args.eval_data or "bundled:eval"))
    domains = [d for d in sorted(eval_by) if d in train_by]
    if args.domains:
        wanted = args.domains.split(",")
        missing = [d for d in wanted if d not in domains]
        if missing:
            sys.exit(f"error: domains {missing} are not in both the training and held-out data; "
                     f"available: {domains}")
        domains = wanted
    if args.smoke:
        domains = domains[:2]
    if not domains:
        sys.exit("error: no domain occurs in both the training and the held-out data "
                 "(documents need a 'domain' field)")

    workdirs = {v: train(args, v) for v in VARIANTS}
    rows = []
    for variant, workdir in workdirs.items():
        rows += measure(variant, workdir, args, train_by, eval_by, domains)
    table = summarise(rows, args.fractions)
    seconds = time.time() - start
    with open(os.path.join(args.out, "replicate.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "summary": table, "seconds": seconds}, f,
                  indent=1)
    write_markdown(os.path.join(args.out, "replicate.md"), rows, table, args.fractions, args,
                   seconds)
    plot(os.path.join(args.out, "replicate.png"), table, args.fractions)
    print(open(os.path.join(args.out, "replicate.md")).read(), flush=True)
    if not args.smoke and not args.no_analysis:
        for variant, workdir in workdirs.items():
            summary = analyse(variant, workdir, args, eval_by, domains)
            shown = ("clusters", "purity", "nmi", "purity_shuffled", "nmi_shuffled",  # tokens
                     "doc_clusters", "doc_purity", "doc_nmi", "doc_purity_shuffled",
                     "doc_nmi_shuffled")  # documents
            print(variant, "analysis:", {k: summary[k] for k in shown if k in summary},
                  flush=True)


if __name__ == "__main__":
    main()
