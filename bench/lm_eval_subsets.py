"""Downstream multiple choice, full model vs expert subsets, through lm-evaluation-harness.

    python bench/lm_eval_subsets.py --checkpoint=runs/replicate/emo --out=runs/lm_eval_subsets \\
        [--fractions=0.25,0.125] [--choices=4] [--docs_per_domain=40] [--context_chars=256] \\
        [--continuation_chars=64] [--select_docs=1] [--train_data=... --eval_data=...] [--seed=0]

1. Builds one local multiple-choice task per domain of the held-out data (default the bundled
   corpus's eval split), written as YAML + JSONL under --out/tasks: the first --context_chars
   characters of a document, then the true next --continuation_chars characters among
   --choices - 1 distractors (the same span of other documents of the same domain), in a
   seeded random order. Metrics: acc, acc_norm (per byte) and acc_mutual_info (the table).
2. Evaluates the full model on every task, then per domain and fraction a subset chosen
   (layerwise, the reference method) from --select_docs training documents of that domain, and
   a random subset of the same size as the control; subsets by masking (what extraction
   computes exactly).
3. Writes lm_eval_subsets.json and lm_eval_subsets.md (table) into --out.

Needs the optional extra (pip install -e '.[lm_eval]') and a trained checkpoint, e.g. the EMO
model of bench/replicate.py (configs/small.py). `--smoke` takes two domains and a few
documents, to check the script on any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from emo_jax import lm_eval_adapter as adapter
from emo_jax.data import read_documents
from emo_jax.modular import runtime
from emo_jax.modular.select import select


def by_domain(docs):
    out = {}
    for doc in docs:
        out.setdefault(doc.get("domain") or "(none)", []).append(doc)
    return out


def build_items(docs, args, rng) -> list[dict]:
    """Context + true continuation among distractors from the same span of other documents."""
    c, k = args.context_chars, args.continuation_chars
    long = [d["text"] for d in docs if len(d["text"]) >= c + k]
    items = []
    for i, text in enumerate(long[:args.docs_per_domain]):
        others = [j for j in range(len(long)) if j != i and long[j][c:c + k] != text[c:c + k]]
        if len(others) < args.choices - 1:
            break
        picks = rng.choice(others, size=args.choices - 1, replace=False)
        choices = [text[c:c + k]] + [long[j][c:c + k] for j in picks]
        order = rng.permutation(args.choices)
        items.append({"context": text[:c], "choices": [choices[o] for o in order],
                      "label": int(np.argmax(order == 0))})
    return items


def write_task(directory: str, domain: str, items: list[dict]) -> str:
    name = "emo_cont_" + "".join(ch if ch.isalnum() else "_" for ch in domain)
    data = os.path.abspath(os.path.join(directory, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: label\ntarget_delimiter: \"\"\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
                "  - metric: acc_mutual_info\n")
    return name


# acc: the choice of largest log-likelihood; acc_norm: per byte; acc_mutual_info: of largest
# log p(choice | context) - log p(choice), which discounts how predictable a choice is by itself
# (the candidates are spans of different documents, so that dominates acc on a small model).
METRICS = ("acc", "acc_norm", "acc_mutual_info")


def run_tasks(lm_eval, scorer, tasks, task_manager) -> dict:
    results = lm_eval.simple_evaluate(model=adapter.EmoJaxLM(scorer=scorer), tasks=tasks,
                                      task_manager=task_manager, verbosity="WARNING")
    return {t: {m: r[f"{m},none"] for m in METRICS}
            for t, r in results["results"].items() if t in tasks}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trained workdir or model directory")
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", default="0.25,0.125")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--docs_per_domain", type=int, default=40)
    p.add_argument("--context_chars", type=int, default=256)
    p.add_argument("--continuation_chars", type=int, default=64)
    p.add_argument("--select_docs", type=int, default=1)
    p.add_argument("--train_data", default="", help="subset selection data ('' = bundled)")
    p.add_argument("--eval_data", default="", help="task source data ('' = bundled eval)")
    p.add_argument("--batch_size", type=int, default=adapter.DEFAULT_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="acc_mutual_info", choices=METRICS,
                   help="the metric of the table (the JSON holds all)")
    p.add_argument("--smoke", action="store_true", help="two domains, few documents")
    args = p.parse_args()
    if not adapter.harness_available():
        sys.exit(f"error: {adapter.INSTALL_HINT}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if args.smoke:
        args.docs_per_domain = min(args.docs_per_domain, 6)
    fractions = [float(f) for f in args.fractions.split(",")]
    start = time.time()
    task_dir = os.path.join(args.out, "tasks")
    os.makedirs(task_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train_by = by_domain(read_documents(args.train_data or "bundled:train"))
    eval_by = by_domain(read_documents(args.eval_data or "bundled:eval"))
    domains = [d for d in sorted(eval_by) if d in train_by][:2 if args.smoke else None]
    tasks, counts = {}, {}
    for domain in domains:
        items = build_items(eval_by[domain], args, rng)
        if items:
            tasks[domain], counts[domain] = write_task(task_dir, domain, items), len(items)
            print(f"{domain}: {len(items)} items -> {tasks[domain]}", flush=True)
    manager = TaskManager(include_path=os.path.abspath(task_dir))

    model, config, _ = runtime.load_model(args.checkpoint)
    tokenizer = runtime.tokenizer_of(config)
    e = config.moe

    def scorer(mask=None):
        return adapter.Scorer(model, tokenizer, seq_len=config.data.seq_len,
                              expert_mask_LR=mask, batch_size=args.batch_size,
                              boundary=config.data.boundary)

    full = run_tasks(lm_eval, scorer(), list(tasks.values()), manager)
    rows = []
    for domain, task in tasks.items():
        row = {"domain": domain, "task": task, "items": counts[domain], "full": full[task]}
        picks = rng.choice(len(train_by[domain]), size=min(args.select_docs,
                                                           len(train_by[domain])), replace=False)
        calib = [train_by[domain][i] for i in picks]
        batches = runtime.document_batches(calib, tokenizer, config.data.seq_len,
                                           boundary=config.data.boundary)
        for fraction in fractions:
            keep = max(e.num_shared_experts + 1, int(round(fraction * e.num_experts)))
            chosen = select(model, batches, keep, "layerwise", data={"documents": len(calib)})
            random_subset = select(model, [], keep, "random", seed=args.seed)
            row[f"chosen_{fraction}"] = run_tasks(lm_eval, scorer(chosen.mask()), [task],
                                                  manager)[task]
            row[f"random_{fraction}"] = run_tasks(lm_eval, scorer(random_subset.mask()), [task],
                                                  manager)[task]
            row[f"keep_{fraction}"] = keep
        rows.append(row)
        print(json.dumps(row), flush=True)
    seconds = time.time() - start
    metric = args.metric
    mean = {key: float(np.mean([r[key][metric] for r in rows]))
            for key in ["full"] + [f"{k}_{f}" for f in fractions for k in ("chosen", "random")]}
    with open(os.path.join(args.out, "lm_eval_subsets.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, f"mean_{metric}": mean, "seconds": seconds}, f,
                  indent=1)
    header = "| domain | full | " + " | ".join(
        f"chosen {f:.1%} | random {f:.1%}" for f in fractions) + " |"
    lines = [f"Command: `python bench/lm_eval_subsets.py {' '.join(sys.argv[1:])}`  ",
             f"Wall time: {seconds / 60:.1f} min. {metric} ({args.choices} choices, chance "
             f"{1 / args.choices:.2f}); subsets by masking, chosen from {args.select_docs} "
             "training document(s) of the domain.", "", header,
             "|---|---|" + "---|---|" * len(fractions)]
    for r in rows + [{"domain": "**mean**", **{k: {metric: v} for k, v in mean.items()}}]:
        lines.append(f"| {r['domain']} | {r['full'][metric]:.3f} | " + " | ".join(
            f"{r[f'chosen_{f}'][metric]:.3f} | {r[f'random_{f}'][metric]:.3f}"
            for f in fractions) + " |")
    with open(os.path.join(args.out, "lm_eval_subsets.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
