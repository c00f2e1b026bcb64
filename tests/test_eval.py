"""`python -m emo_jax.eval`: loss and perplexity of a checkpoint, overall and per domain, and
the library function with an expert mask (what a subset evaluation passes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from emo_jax.config import routed_experts
from emo_jax.data.sources import read_documents
from emo_jax.evaluation import evaluate
from emo_jax.model_files import restore_model

DOCS = [
    {"text": "def add(a, b):\n    return a + b\n" * 3, "domain": "code"},
    {"text": "The court held that the contract was void for want of consideration. " * 2,
     "domain": "legal"},
    {"text": "int main(void) { return 0; }\n" * 4, "domain": "code"},
    {"text": "A plain document without any domain field at all, just some words."},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return str(path)


@pytest.fixture(scope="module")
def cli_result(reference, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out") / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "emo_jax.eval", f"--checkpoint={reference}", f"--data={data_file}",
         "--by_domain", f"--out={out}"],
        cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        return json.load(f), proc.stdout


def test_eval_cli_reports_loss_and_perplexity_per_domain(cli_result):
    result, stdout = cli_result
    assert result["step"] == th.STEPS
    assert math.isfinite(result["loss"]) and 0 < result["loss"] < 10
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    by = result["by_domain"]
    assert sorted(by) == ["(none)", "code", "legal"]
    assert by["code"]["documents"] == 2 and by["legal"]["documents"] == 1
    assert sum(d["tokens"] for d in by.values()) == result["tokens"]
    # Every token predicted once: a document of n bytes is n + 1 tokens (EOS), split into
    # pieces of at most seq_len (128) tokens; each piece predicts all its tokens but the first.
    pieces = [math.ceil((len(d["text"].encode()) + 1) / 128) for d in DOCS]
    assert result["tokens"] == sum(len(d["text"].encode()) + 1 for d in DOCS) - sum(pieces)
    weighted = sum(d["loss"] * d["tokens"] for d in by.values()) / result["tokens"]
    assert weighted == pytest.approx(result["loss"], rel=1e-6)
    assert "all: loss" in stdout and "code: loss" in stdout


def test_evaluate_with_a_full_expert_mask_matches(reference, data_file, cli_result):
    model, config, _ = restore_model(reference)
    routed = routed_experts(config)
    mask = np.ones((config.model.num_layers, routed), bool)
    result = evaluate(model, config, read_documents(data_file), expert_mask_LR=mask)
    assert result["loss"] == pytest.approx(cli_result[0]["loss"], rel=1e-5)
    assert result["tokens"] == cli_result[0]["tokens"]


def test_eval_cli_bad_checkpoint_is_one_line(tmp_path, data_file):
    proc = subprocess.run(
        [sys.executable, "-m", "emo_jax.eval", f"--checkpoint={tmp_path}", f"--data={data_file}"],
        cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no emo_jax checkpoint"), proc.stderr


def test_eval_pool_is_honoured_by_the_library_and_the_cli(reference, data_file, cli_result,
                                                          tmp_path):
    """moe.eval_pool (a fixed pool per segment, the reference's training-time evaluation uses
    32): 0 by default (plain top-k, as served); a pool smaller than R changes the loss, and
    `python -m emo_jax.eval --eval_pool=P` reports what the library computes."""
    from emo_jax.evaluation import with_eval_pool

    model, config, _ = restore_model(reference)
    assert config.moe.eval_pool == 0 and cli_result[0]["eval_pool"] == 0
    docs = read_documents(data_file)
    plain = evaluate(model, config, docs)
    assert plain["loss"] == pytest.approx(cli_result[0]["loss"], rel=1e-6)
    model, pooled_config = with_eval_pool(model, config, 4)  # R = 15 routed experts
    assert model.config.eval_pool == 4 and pooled_config.moe.eval_pool == 4
    pooled = evaluate(model, pooled_config, docs)
    assert pooled["tokens"] == plain["tokens"]
    assert abs(pooled["loss"] - plain["loss"]) > 1e-4  # the pool restricts routing
    # what the forward computes by itself with pool_key=None and moe.eval_pool=4
    same, _ = with_eval_pool(restore_model(reference)[0], config, 4)
    assert evaluate(same, pooled_config, docs)["loss"] == pytest.approx(pooled["loss"], rel=1e-6)
    out = tmp_path / "pooled.json"
    proc = subprocess.run(
        [sys.executable, "-m", "emo_jax.eval", f"--checkpoint={reference}", f"--data={data_file}",
         "--eval_pool=4", f"--out={out}"],
        cwd=th.REPO, env=th.cli_env(), text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["eval_pool"] == 4
    assert result["loss"] == pytest.approx(pooled["loss"], rel=1e-5)
    with pytest.raises(Exception, match="eval_pool"):
        with_eval_pool(model, config, 1)  # below top_k (2): refused
