"""What lowers EMO's full-model tax at small scale without losing the subset result.

    python bench/tax_study.py --out=runs/tax [--settings=baseline,pool8,...] [--steps=1000] \\
        [--config=configs/small.py] [--train_data=... --eval_data=...] [--config.x=y ...]

For each named setting (SETTINGS below; `--list` prints them) this trains the pair of
`bench/replicate.py` (EMO vs the standard MoE, identical but for `moe.pool`) with the setting's
overrides, and measures both with replicate's own `train` / `measure` (layerwise subsets from one
training document per domain, extracted, evaluated on the held-out documents of the domain).
A setting's overrides are split into those of both models and those of EMO only (the pool
range means nothing to a standard MoE): the standard MoE of settings that differ only in EMO's
overrides is trained and measured once and shared. Finished runs and measurements are reused,
so an interrupted study resumes.

Writes `tax_study.json`, `tax_study.md` and `tax_study.png` into --out: per setting, the
full-model held-out loss of both models (mean over domains), the tax (EMO / standard - 1), the
tax against the best standard MoE the study trained for as many steps (a setting that changes
both models cannot lower that one by making the standard MoE worse), the tax of the last
evaluation each training run logged (token-weighted, where the study weights domains equally),
the loss increase of the chosen subsets at each fraction (default 25% and 12.5%) for both models,
and how many experts per layer got no token in a training step (mean of the last 10 logged
steps; ~0 when the balance holds). The figure puts each setting at (tax against the best
standard MoE, EMO's increase at the smallest fraction / the standard MoE's). The bar for adopting
a setting in configs/small.py: a lower tax against the best standard MoE, EMO's 12.5% increase
at most a third of the standard MoE's, and every expert still in use; the goal is a tax of at
most 3% on the bundled corpus.

The pool schedule studied is "no pool for the last part of training" (`moe.pool_off_fraction`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python bench/tax_study.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import replicate  # noqa: E402
from emo_jax.data import read_documents  # noqa: E402

# name -> (overrides of both models, overrides of EMO only, steps or None = --steps).
SETTINGS = {
    "baseline": ([], [], None),  # pools of 4..32 (STUDY_BASE_EMO)
    # Balance groups: configs/small.py balances over the whole 16-row step ('global'); smaller
    # groups show how much the group size matters (4 rows ~ the reference's per-GPU share).
    "group4": (["--config.moe.balance_group_rows=4"], [], None),
    "group1": (["--config.moe.balance_group_rows=1"], [], None),
    # Pool range: 6..R or 8..R instead of 4..R (top_k); the reference's lowest pool is top_k + 1.
    "pool6": ([], ["--config.moe.pool_min=6"], None),
    "pool8": ([], ["--config.moe.pool_min=8"], None),
    "pool16": ([], ["--config.moe.pool_min=16"], None),
    # Pool schedule: the last 20% / 10% of the steps route plain top-k.
    "pooloff0.2": ([], ["--config.moe.pool_off_fraction=0.2"], None),
    "pooloff0.1": ([], ["--config.moe.pool_off_fraction=0.1"], None),
    # Training length.
    "steps3k": ([], [], 3000),
    # Balance weight (total over the layers; configs/small.py: 0.1).
    "balance0.03": (["--config.moe.balance_weight=0.03"], [], None),
    "balance0.01": (["--config.moe.balance_weight=0.01"], [], None),
    # The reference's conventions: eos opens a document, truncated-normal initialisation.
    "reference_conventions": (["--config.data.boundary=eos_opens",
                               "--config.model.init=truncated_normal"], [], None),
}


# The study's settings vary configs/small.py as it stood when the study began, with pools of
# 4..32 experts (its default is now 6..32, the `pool6` setting): EMO's runs start from these
# overrides, and a setting's own come after them.
STUDY_BASE_EMO = ["--config.moe.pool_min=4"]


def _key(overrides) -> str:
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:10]


def _run_args(args, out, steps, overrides):
    """The namespace replicate.train / replicate.measure read."""
    return argparse.Namespace(out=out, config=args.config, steps=steps,
                              train_data=args.train_data, eval_data=args.eval_data,
                              override=list(overrides), seed=args.seed,
                              max_eval_docs=args.max_eval_docs, select_docs=args.select_docs,
                              fractions=args.fractions)


def _measured(path, variant, run_args, data):
    """replicate's rows of one trained model, cached in `path` (rows.json next to the run)."""
    cache = os.path.join(path, f"{variant}_rows.json")
    if os.path.exists(cache):  # trained and measured before
        with open(cache) as f:
            return json.load(f)
    workdir = replicate.train(run_args, variant)
    rows = replicate.measure(variant, workdir, run_args, *data)
    with open(cache, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def _logged(workdir, key) -> list:
    """The values of `key` in a training workdir's metrics.jsonl, in order (records without it
    are left out; empty without the file)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        values = [json.loads(line).get(key) for line in f if line.strip()]
    return [v for v in values if v is not None]


def unused_experts(workdir, last=10) -> float:
    """Experts per layer that got no assignment in a step: the mean over the layers and the last
    `last` logged steps of a training workdir's metrics.jsonl (NaN without such records)."""
    counts = [c for c in _logged(workdir, "unused_experts") if c][-last:]
    return sum(sum(c) / len(c) for c in counts) / len(counts) if counts else float("nan")


def logged_eval_loss(workdir) -> float:
    """The last `eval_loss` a training workdir logged (NaN without one): the training-time
    evaluation, which counts each held-out token of its batches once, so it weights the domains
    by their tokens where the study's own measurement weights them equally."""
    losses = _logged(workdir, "eval_loss")
    return losses[-1] if losses else float("nan")


def run_setting(name, args, data):
    both, emo_only, steps = SETTINGS[name] if name in SETTINGS else args.custom[name]
    steps = steps or args.steps
    common = [*args.smoke_overrides, *both, *args.override]
    emo_dir = os.path.join(args.out, name)
    std_dir = os.path.join(args.out, "standard", f"{steps}_{_key(common)}")
    os.makedirs(std_dir, exist_ok=True)
    with open(os.path.join(std_dir, "overrides.json"), "w") as f:
        json.dump({"steps": steps, "overrides": common}, f, indent=1)
    rows = _measured(emo_dir, "emo", _run_args(args, emo_dir, steps,
                                               [*common, *STUDY_BASE_EMO, *emo_only]), data)
    rows += _measured(std_dir, "standard", _run_args(args, std_dir, steps, common), data)
    table = replicate.summarise(rows, args.fractions)
    emo, std = table["emo"], table["standard"]
    return {"setting": name, "steps": steps, "both": both, "emo_only": emo_only,
            "emo_full": emo["full"], "standard_full": std["full"],
            "tax": emo["full"] / std["full"] - 1.0,
            "emo_increase": {f: emo[f"chosen_{f}"] for f in args.fractions},
            "standard_increase": {f: std[f"chosen_{f}"] for f in args.fractions},
            "emo_unused": unused_experts(os.path.join(emo_dir, "emo")),
            "standard_unused": unused_experts(os.path.join(std_dir, "standard")),
            "logged_tax": (logged_eval_loss(os.path.join(emo_dir, "emo"))
                           / logged_eval_loss(os.path.join(std_dir, "standard")) - 1.0),
            "rows": rows}


def subset_ratio(result, fraction) -> float:
    """EMO's loss increase at `fraction` as a share of the standard MoE's (NaN if that is 0)."""
    std = result["standard_increase"][fraction]
    return result["emo_increase"][fraction] / std if std else float("nan")


def add_best_standard_tax(results) -> None:
    """Set each result's `tax_vs_best_standard`: its EMO full loss against the best standard MoE
    the study trained for as many steps. A setting that changes both models can lower its own tax
    by making the standard MoE worse; against the best standard MoE it cannot."""
    best = {}
    for r in results:
        best[r["steps"]] = min(best.get(r["steps"], float("inf")), r["standard_full"])
    for r in results:
        r["tax_vs_best_standard"] = r["emo_full"] / best[r["steps"]] - 1.0


def write_markdown(path, results, args, seconds):
    fr = args.fractions
    lines = [f"Command: `python bench/tax_study.py {' '.join(sys.argv[1:])}`  ",
             f"Wall time of this command: {seconds / 60:.1f} min (settings finished before are "
             "reused, not run again). Held-out loss in nats per token, mean over "
             "domains; tax = EMO full / standard full - 1 (the setting's own standard MoE); "
             "vs best std = EMO full / the lowest standard full of the study at the same steps "
             "- 1; logged tax = the same from the last evaluation training logged (each "
             "held-out token of its batches counted once); +f = loss increase of the layerwise "
             "subset keeping fraction f of the experts (chosen from one training document per "
             "domain); unused experts = experts per layer with no token in a training step "
             "(mean of the last 10 logged steps).", "",
             "| setting | steps | EMO full | standard full | tax | vs best std | logged tax | "
             + " | ".join(f"EMO +{f:.1%} | std +{f:.1%}" for f in fr) + " | EMO/std at "
             f"{fr[-1]:.1%} | unused experts EMO / std |",
             "|---|---|---|---|---|---|---|" + "---|---|" * len(fr) + "---|---|"]
    for r in results:
        ratio = subset_ratio(r, fr[-1])
        lines.append(
            f"| {r['setting']} | {r['steps']} | {r['emo_full']:.4f} | {r['standard_full']:.4f} | "
            f"{r['tax']:+.2%} | {r['tax_vs_best_standard']:+.2%} | {r['logged_tax']:+.2%} | "
            + " | ".join(
                f"{r['emo_increase'][f]:+.3f} | {r['standard_increase'][f]:+.3f}" for f in fr)
            + f" | {ratio:.2f} | {r['emo_unused']:.1f} / {r['standard_unused']:.1f} |")
    lines += ["", "Settings (overrides of both models; of EMO only):", ""]
    for r in results:
        lines.append(f"- `{r['setting']}`: {' '.join(r['both']) or '-'}; "
                     f"{' '.join(r['emo_only']) or '-'}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, results, fractions):
    """Each setting as a point: its tax against the best standard MoE (a filled dot; an open one
    joined to it where the setting's own standard MoE gives another tax) and EMO's loss increase
    at the smallest fraction as a share of the standard MoE's, with the bars (a tax of 3%, a
    third) as lines."""
    import matplotlib  # deferred: heavy, and the backend is chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = fractions[-1]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        ratio, best, own = subset_ratio(r, last), 100 * r["tax_vs_best_standard"], 100 * r["tax"]
        (dot,) = ax.plot(best, ratio, "o")
        if abs(own - best) > 0.005:
            ax.plot([best, own], [ratio, ratio], "-", color=dot.get_color(), lw=0.8)
            ax.plot(own, ratio, "o", mfc="none", color=dot.get_color())
        ax.annotate(r["setting"], (best, ratio), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.axvline(3.0, color="gray", lw=0.8, ls="--")
    ax.axhline(1 / 3, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("full-model tax against the best standard MoE (%; open: its own)")
    ax.set_ylabel(f"EMO / standard loss increase at {last:.1%}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_custom(specs):
    """--custom=NAME:BOTH:EMO_ONLY with space-separated --config.x=y flags in each part."""
    out = {}
    for spec in specs:
        name, both, emo = (spec.split(":") + ["", ""])[:3]
        out[name] = (both.split(), emo.split(), None)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory of the runs and the results")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    p.add_argument("--custom", action="append", default=[],
                   help="an extra setting NAME:BOTH:EMO_ONLY (space-separated --config flags)")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--steps", type=int, default=1000, help="steps of settings that set none")
    p.add_argument("--train_data", default="")
    p.add_argument("--eval_data", default="")
    p.add_argument("--fractions", default="0.25,0.125")
    p.add_argument("--select_docs", type=int, default=1)
    p.add_argument("--max_eval_docs", type=int, default=64)
    p.add_argument("--domains", default="", help="comma-separated domains (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="no evaluation or checkpoints during training, two domains (CI)")
    args, extra = p.parse_known_args()
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.custom = _parse_custom(args.custom)
    if args.list:
        for name, (both, emo, steps) in {**SETTINGS, **args.custom}.items():
            print(f"{name}: both {both or '-'}; EMO only {emo or '-'}; steps {steps or '--steps'}")
        return
    if not args.out:
        p.error("--out is required")
    names = [n for n in args.settings.split(",") if n] + [
        n for n in args.custom if n not in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS and n not in args.custom]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    args.override = extra
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.smoke_overrides = (["--config.train.eval_every=0", "--config.checkpoint.every=100000"]
                            if args.smoke else [])
    start = time.time()
    os.makedirs(args.out, exist_ok=True)

    train_by = replicate.by_domain(read_documents(args.train_data or "bundled:train"))
    eval_by = replicate.by_domain(read_documents(args.eval_data or "bundled:eval"))
    domains = [d for d in sorted(eval_by) if d in train_by]
    if args.domains:
        domains = [d for d in args.domains.split(",") if d in domains]
    if args.smoke:
        domains = domains[:2]
    if not domains:
        sys.exit("error: no domain occurs in both the training and the held-out data")
    data = (train_by, eval_by, domains)

    results = []
    for name in names:
        print(f"=== setting {name}", flush=True)
        results.append(run_setting(name, args, data))
        add_best_standard_tax(results)
        seconds = time.time() - start
        with open(os.path.join(args.out, "tax_study.json"), "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "custom"},
                       "domains": domains, "results": results, "seconds": seconds}, f, indent=1)
        write_markdown(os.path.join(args.out, "tax_study.md"), results, args, seconds)
        plot(os.path.join(args.out, "tax_study.png"), results, args.fractions)
    print(open(os.path.join(args.out, "tax_study.md")).read(), flush=True)


if __name__ == "__main__":
    main()
