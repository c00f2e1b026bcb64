"""The modular tools end to end, as a user runs them, on the session's tiny trained checkpoint:
select (file and literal text) -> compose -> extract -> eval / generate / select the extracted
model, masked subsets against extracted ones, analyze, and one-line errors.

Independent commands run concurrently (the CPU test machines have 2 cores), and all share the
persistent compilation cache of train_helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from emo_jax.data.sources import read_documents
from emo_jax.modular import analysis, subset as subset_lib

PROMPT = "def parse(text):\n    "


def run_all(commands: dict, *, expect_ok=True) -> dict:
    """Runs `python -m emo_jax.<verb> ARGS` commands concurrently: {name: CompletedProcess}."""
    procs = {name: subprocess.Popen([sys.executable, "-m", *cmd], cwd=th.REPO, env=th.cli_env(),
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if expect_ok:
            assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{stdout}\n{stderr}"
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Three documents of each of three domains of the bundled eval split, shortened."""
    docs, per = [], {}
    for doc in read_documents("bundled:eval"):
        if doc["domain"] in ("python", "legal", "prose") and per.get(doc["domain"], 0) < 3:
            per[doc["domain"]] = per.get(doc["domain"], 0) + 1
            docs.append({"text": doc["text"][:300], "domain": doc["domain"]})
    path = tmp_path_factory.mktemp("modular_data") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


@pytest.fixture(scope="module")
def chain(workdir, data_file, tmp_path_factory):
    """Every tool once (once per session: the xdist workers share it); returns the directory
    holding their outputs and their results."""
    d = th.shared_once(tmp_path_factory, "modular_cli_chain",
                       lambda path: _run_chain(path, workdir, data_file))
    saved = json.loads((d / "results.json").read_text())
    return d, {name: subprocess.CompletedProcess(r["args"], r["returncode"], r["stdout"],
                                                 r["stderr"]) for name, r in saved.items()}


def _run_chain(d, workdir, data_file):
    ck = f"--checkpoint={workdir}"
    results = run_all({
        "select_data": ["emo_jax.select", ck, f"--data={data_file}", "--keep=5",
                        f"--out={d}/a.json"],
        "select_text": ["emo_jax.select", ck, "--text=The court held that the contract was void.",
                        "--keep=4", "--method=global", f"--out={d}/b.json"],
        "select_budget": ["emo_jax.select", ck, f"--data={data_file}", "--keep_total=13",
                          "--method=global", f"--out={d}/budget.json"],
    })
    results.update(run_all({"compose": ["emo_jax.select", "--compose", f"{d}/a.json",
                                        f"{d}/b.json", f"--out={d}/ab.json"]}))
    greedy = [f"--prompt={PROMPT}", "--max_new_tokens=24", "--temperature=0"]
    results.update(run_all({
        "extract": ["emo_jax.extract", ck, f"--subset={d}/ab.json", f"--out={d}/small"],
        "extract_budget": ["emo_jax.extract", ck, f"--subset={d}/budget.json",
                           f"--out={d}/budget"],
        "eval_budget_masked": ["emo_jax.eval", ck, f"--data={data_file}",
                               f"--subset={d}/budget.json", f"--out={d}/eval_budget_masked.json"],
        "eval_masked": ["emo_jax.eval", ck, f"--data={data_file}", f"--subset={d}/ab.json",
                        f"--out={d}/eval_masked.json"],
        "generate_masked": ["emo_jax.generate", ck, f"--subset={d}/ab.json", *greedy],
        "analyze": ["emo_jax.analyze", ck, f"--data={data_file}", f"--out={d}/analysis",
                    "--clusters=6", "--pca_dims=8"],
    }))
    small = f"--checkpoint={d}/small"
    results.update(run_all({
        "eval_small": ["emo_jax.eval", small, f"--data={data_file}", f"--out={d}/eval_small.json"],
        "generate_small": ["emo_jax.generate", small, *greedy],
        "select_small": ["emo_jax.select", small, f"--data={data_file}", "--keep=3",
                         f"--out={d}/c.json"],
        "eval_budget": ["emo_jax.eval", f"--checkpoint={d}/budget", f"--data={data_file}",
                        f"--out={d}/eval_budget.json"],
        "generate_budget": ["emo_jax.generate", f"--checkpoint={d}/budget", *greedy],
        "generate_from_prompt": ["emo_jax.generate", ck, "--subset_from_prompt=4", *greedy],
    }))
    (d / "results.json").write_text(json.dumps({
        name: {"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
               "stderr": r.stderr} for name, r in results.items()}))


def test_select_and_compose_write_valid_subsets(chain):
    d, results = chain
    a, b, ab = (subset_lib.load(f"{d}/{n}.json") for n in ("a", "b", "ab"))
    assert (a.keep, a.method, b.keep, b.method) == (5, "layerwise", 4, "global")
    assert a.data["documents"] == 9 and b.data["documents"] == 1
    for layer in range(a.num_layers):
        assert set(a.layers[layer]) | set(b.layers[layer]) <= set(ab.layers[layer])
    assert "kept 5 of 16 experts per layer (1 shared + 4 routed)" in results["select_data"].stdout


def test_extracted_checkpoint_equals_the_masked_model_and_is_smaller(chain):
    d, results = chain
    with open(f"{d}/eval_masked.json") as f:
        masked = json.load(f)
    with open(f"{d}/eval_small.json") as f:
        small = json.load(f)
    assert masked["subset"].endswith("ab.json")
    assert small["tokens"] == masked["tokens"]
    assert small["loss"] == pytest.approx(masked["loss"], rel=1e-5)
    text = results["generate_masked"].stdout
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert results["generate_small"].stdout == text
    with open(f"{d}/small/metadata.json") as f:
        report = json.load(f)["extract"]
    assert report["params_after"] < report["params_before"]
    assert report["bytes_after"] == 4 * report["params_after"]
    assert f"{report['params_before']:,} -> {report['params_after']:,}" in \
        results["extract"].stdout
    # The extracted model is selectable again, with subsets of its own size.
    c = subset_lib.load(f"{d}/c.json")
    assert c.model["shape"]["moe.num_experts"] == subset_lib.load(f"{d}/ab.json").keep
    assert "experts: 4 of 16 per layer (layerwise)" in results["generate_from_prompt"].stderr


def test_budget_subset_extracts_to_a_model_with_per_layer_counts(chain, tmp_path):
    """select --keep_total chooses per-layer counts; the extracted model evaluates as the
    masked full model, generates, and fine-tunes."""
    d, results = chain
    budget = subset_lib.load(f"{d}/budget.json")
    assert isinstance(budget.keep, list) and sum(budget.keep) == 13
    assert "kept 13 experts in 2 layers" in results["select_budget"].stdout
    with open(f"{d}/budget/config.json") as f:
        config = json.load(f)
    assert config["moe"]["experts_per_layer"] == ",".join(map(str, budget.keep))
    with open(f"{d}/eval_budget_masked.json") as f:
        masked = json.load(f)
    with open(f"{d}/eval_budget.json") as f:
        small = json.load(f)
    assert small["tokens"] == masked["tokens"]
    assert small["loss"] == pytest.approx(masked["loss"], rel=1e-5)
    text = results["generate_budget"].stdout
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    proc = subprocess.run(th.train_cmd(tmp_path / "ft", f"--init_checkpoint={d}/budget",
                                       "--config.train.steps=2"),
                          cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert th.step_records(tmp_path / "ft")[2]["loss"] > 0
    with open(tmp_path / "ft" / "config.json") as f:
        assert json.load(f)["moe"]["experts_per_layer"] == config["moe"]["experts_per_layer"]


def test_analyze_writes_its_files_and_its_scores_are_right(chain):
    d, results = chain
    out = f"{d}/analysis"
    files = set(os.listdir(out))
    assert {"report.md", "analysis.json", "jaccard.png", "clusters.png", "tokens.npz",
            "doc_clusters.png", "documents.npz", "usage_layer_00.png",
            "usage_layer_01.png"} <= files
    with open(f"{out}/analysis.json") as f:
        summary = json.load(f)
    tokens = np.load(f"{out}/tokens.npz")
    assert summary["domains"] == ["legal", "prose", "python"]
    assert summary["cluster_tokens"] == len(tokens["cluster"]) == 9 * 100
    # Purity and NMI recomputed from the saved per-token labels.
    truth, pred = tokens["domain"], tokens["cluster"]
    table = np.zeros((truth.max() + 1, pred.max() + 1))
    np.add.at(table, (truth, pred), 1)
    assert summary["purity"] == pytest.approx(table.max(0).sum() / table.sum(), rel=1e-12)
    assert summary["nmi"] == pytest.approx(analysis.nmi(truth, pred), rel=1e-12)
    # Document level: one point per document, k = the number of domains by default.
    documents = np.load(f"{out}/documents.npz")
    assert summary["cluster_documents"] == len(documents["cluster"]) == 9
    assert summary["doc_clusters"] <= 3
    truth, pred = documents["domain"], documents["cluster"]
    assert summary["doc_purity"] == pytest.approx(analysis.purity(truth, pred), rel=1e-12)
    assert summary["doc_nmi"] == pytest.approx(analysis.nmi(truth, pred), rel=1e-12)
    report = open(f"{out}/report.md").read()
    assert "![token clusters](clusters.png)" in report and "usage_layer_01.png" in report
    assert "![document clusters](doc_clusters.png)" in report
    assert f"{summary['purity']:.3f}" in report and f"{summary['doc_nmi']:.3f}" in report
    assert "purity" in results["analyze"].stdout
    assert f"clusters of 9 documents: purity {summary['doc_purity']:.3f}" in \
        results["analyze"].stdout


def test_user_mistakes_are_one_line_errors(chain, workdir, data_file, tmp_path):
    d, _ = chain
    ck = f"--checkpoint={workdir}"
    results = run_all({
        "keep_low": ["emo_jax.select", ck, f"--data={data_file}", "--keep=1",
                     f"--out={tmp_path}/x.json"],
        "keep_high": ["emo_jax.select", ck, "--text=hello", "--keep=17",
                      f"--out={tmp_path}/x.json"],
        "other_model": ["emo_jax.extract", f"--checkpoint={d}/small", f"--subset={d}/a.json",
                        f"--out={tmp_path}/y"],
        "no_subset": ["emo_jax.eval", ck, f"--data={data_file}", f"--subset={tmp_path}/no.json"],
        "no_checkpoint": ["emo_jax.generate", f"--checkpoint={tmp_path}/none", "--prompt=hi"],
        "exists": ["emo_jax.extract", ck, f"--subset={d}/a.json", f"--out={d}/small"],
    }, expect_ok=False)
    expected = {
        "keep_low": "2 <= K <= 16", "keep_high": "2 <= K <= 16",
        "other_model": "moe.num_experts=16 there but", "no_subset": "does not exist",
        "no_checkpoint": "no emo_jax checkpoint", "exists": "exists",
    }
    for name, proc in results.items():
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert lines and lines[-1].startswith("error: ") and expected[name] in lines[-1], \
            (name, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)


@pytest.mark.slow
def test_extracted_checkpoint_fine_tunes(chain, tmp_path):
    d, _ = chain
    keep = subset_lib.load(f"{d}/ab.json").keep
    proc = subprocess.run(th.train_cmd(tmp_path / "ft", f"--init_checkpoint={d}/small",
                                       f"--config.moe.num_experts={keep}",
                                       "--config.train.steps=2"),
                          cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert th.step_records(tmp_path / "ft")[2]["loss"] > 0
