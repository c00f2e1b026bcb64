"""Experts kept per layer against a total budget: does letting the layers keep different numbers
of experts (`select --keep_total`) beat the same number in every layer?

    python bench/budget_subsets.py --checkpoint=runs/replicate/emo --out=runs/budget \\
        [--fractions=0.25,0.125] [--select_docs=1] [--max_eval_docs=64] [--seed=0]

For each domain of the held-out data (default the bundled corpus's eval split) and each fraction
f, three subsets of the same total size (f of all experts) are chosen from --select_docs
training documents of the domain and evaluated on its held-out documents by masking (which
computes what extraction computes; tests/test_layer_experts.py):

  layerwise  K = f * E in every layer, the reference's greedy selection
  global     K = f * E in every layer, router mass of one pass of the full model
  budget     N = L * K in all, router mass of the same pass (per-layer counts chosen)

Writes budget_subsets.json and budget_subsets.md (mean loss increase over the full model, and
the per-layer counts the budget chose) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # `python bench/budget_subsets.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.replicate import by_domain, fraction_to_keep  # noqa: E402
from emo_jax.data import read_documents  # noqa: E402
from emo_jax.evaluation import evaluate  # noqa: E402
from emo_jax.modular import runtime  # noqa: E402
from emo_jax.modular.select import select  # noqa: E402

METHODS = ("layerwise", "global", "budget")


def choose(method, model, batches, keep, layers):
    if method == "budget":
        return select(model, batches, None, "global", keep_total=keep * layers)
    return select(model, batches, keep, method)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", default="0.25,0.125")
    p.add_argument("--select_docs", type=int, default=1)
    p.add_argument("--max_eval_docs", type=int, default=64)
    p.add_argument("--train_data", default="")
    p.add_argument("--eval_data", default="")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    start = time.time()
    model, config, _ = runtime.load_model(args.checkpoint)
    tokenizer = runtime.tokenizer_of(config)
    layers = config.model.num_layers
    train_by = by_domain(read_documents(args.train_data or "bundled:train"))
    eval_by = by_domain(read_documents(args.eval_data or "bundled:eval"))
    rng = np.random.default_rng(args.seed)
    rows = []
    for domain in [d for d in sorted(eval_by) if d in train_by]:
        eval_docs = eval_by[domain][:args.max_eval_docs]
        full = evaluate(model, config, eval_docs)["loss"]
        pick = rng.choice(len(train_by[domain]), size=min(args.select_docs,
                                                           len(train_by[domain])), replace=False)
        batches = runtime.document_batches([train_by[domain][i] for i in pick], tokenizer,
                                           config.data.seq_len, boundary=config.data.boundary)
        for fraction in fractions:
            keep = fraction_to_keep(fraction, config)
            row = {"domain": domain, "fraction": fraction, "keep": keep, "full": full}
            for method in METHODS:
                subset = choose(method, model, batches, keep, layers)
                loss = evaluate(model, config, eval_docs, expert_mask_LR=subset.mask())["loss"]
                row[method] = loss - full
                if method == "budget":
                    row["budget_counts"] = subset.keep_per_layer
            rows.append(row)
            print(json.dumps(row), flush=True)
    seconds = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget_subsets.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "seconds": seconds}, f, indent=1)
    lines = [f"Command: `python bench/budget_subsets.py {' '.join(sys.argv[1:])}`  ",
             f"Wall time: {seconds / 60:.1f} min. Mean held-out loss increase over the full "
             f"model (nats per token, {len({r['domain'] for r in rows})} domains); the same "
             f"number of experts in all three ({layers} layers).", "",
             "| kept | " + " | ".join(METHODS) + " | budget's per-layer counts (mean) |",
             "|---|" + "---|" * (len(METHODS) + 1)]
    for fraction in fractions:
        sel = [r for r in rows if r["fraction"] == fraction]
        counts = np.mean([r["budget_counts"] for r in sel], axis=0)
        lines.append(f"| {fraction:.1%} ({sel[0]['keep']} per layer) | " + " | ".join(
            f"{np.mean([r[m] for r in sel]):+.3f}" for m in METHODS) + " | "
            + ", ".join(f"{c:.1f}" for c in counts) + " |")
    with open(os.path.join(args.out, "budget_subsets.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
