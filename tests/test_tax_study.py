"""bench/tax_study.py without training: its settings and its table (a real smoke run trains
three small models, minutes on a CPU: run `python bench/tax_study.py --out=DIR
--settings=baseline,pool8 --steps=20 --smoke --max_eval_docs=3` by hand)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import tax_study  # noqa: E402


def test_list_prints_every_setting():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tax_study.py"), "--list",
                          "--custom=mine:--config.moe.balance_weight=0.05:"], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=120).stdout
    for name in [*tax_study.SETTINGS, "mine"]:
        assert f"{name}:" in out


def test_table_has_the_tax_and_the_subset_increases(tmp_path):
    args = argparse.Namespace(fractions=[0.25, 0.125])
    results = [{"setting": "baseline", "steps": 1000, "both": [], "emo_only": [],
                "emo_full": 1.039, "standard_full": 1.0, "tax": 0.039,
                "emo_increase": {0.25: 0.03, 0.125: 0.1},
                "standard_increase": {0.25: 0.45, 0.125: 0.69},
                "emo_unused": 0.25, "standard_unused": 0.0, "logged_tax": 0.05},
               {"setting": "group4", "steps": 1000, "both": ["--config.moe.balance_group_rows=4"],
                "emo_only": [], "emo_full": 1.03, "standard_full": 1.02, "tax": 0.03 / 1.02,
                "emo_increase": {0.25: 0.02, 0.125: 0.09},
                "standard_increase": {0.25: 0.4, 0.125: 0.6},
                "emo_unused": 0.0, "standard_unused": 0.0, "logged_tax": 0.01}]
    tax_study.add_best_standard_tax(results)
    tax_study.write_markdown(tmp_path / "t.md", results, args, 60.0)
    text = (tmp_path / "t.md").read_text()
    assert ("| baseline | 1000 | 1.0390 | 1.0000 | +3.90% | +3.90% | +5.00% | +0.030 | +0.450 "
            "| +0.100 | +0.690 | 0.14 | 0.2 / 0.0 |") in text
    # group4's own standard MoE is worse than the baseline's: its tax against that one is lower
    assert "| group4 | 1000 | 1.0300 | 1.0200 | +2.94% | +3.00% | +1.00% |" in text
    tax_study.plot(tmp_path / "t.png", results, args.fractions)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_unused_experts_averages_the_last_logged_steps(tmp_path):
    lines = [{"step": 0, "event": "start"}] + [
        {"step": s, "unused_experts": [s, 0.0]} for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # the last 10 steps (3..12), each the mean over its 2 layers
    assert tax_study.unused_experts(str(tmp_path)) == sum(s / 2 for s in range(3, 13)) / 10
    assert tax_study.unused_experts(str(tmp_path / "none")) != tax_study.unused_experts(
        str(tmp_path / "none"))  # NaN without metrics


def test_logged_eval_loss_is_the_last_evaluation(tmp_path):
    lines = [{"step": 0, "event": "start"}, {"step": 100, "eval_loss": 3.0}, {"step": 150},
             {"step": 200, "eval_loss": 2.5}, {"step": 200, "event": "done"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert tax_study.logged_eval_loss(str(tmp_path)) == 2.5
    assert tax_study.logged_eval_loss(str(tmp_path / "none")) != tax_study.logged_eval_loss(
        str(tmp_path / "none"))  # NaN without metrics
