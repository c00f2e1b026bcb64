"""Request logs (emo_jax/modular/request_log.py): the per-request (generate) and per-document
(eval) expert counts equal the routing decisions of the model, recomputed by running each
request's tokens through the model's own forward pass and summing its routing statistics."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from emo_jax.model import decode
from emo_jax.modular import extract, request_log, subset as subset_lib

from modular_helpers import random_model, tiny_config

PROMPTS = [[30, 31, 32, 33, 34, 35], [90, 12, 200, 7, 7, 41]]
NEW = 10


def spread_config():
    config = tiny_config()
    config.model.init_std = 0.3  # spread logits: greedy decoding does not repeat one token
    return config


@pytest.fixture(scope="module")
def model():
    return random_model(spread_config(), 11)


@nnx.jit
def _counts(model, tokens_1S, segment_ids_1S):
    positions = (jnp.cumsum(segment_ids_1S, axis=1) - 1) * segment_ids_1S
    return model(tokens_1S, segment_ids_1S, positions).routing.counts_BR[:, 0]


def forward_counts(model, ids, width=48) -> np.ndarray:
    """[L, R] routed assignments of one document (one row, padded to `width` so one compiled
    forward serves every length), from the model's forward statistics."""
    tokens, segments = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    tokens[0, :len(ids)], segments[0, :len(ids)] = ids, 1
    counts = _counts(model, jnp.asarray(tokens), jnp.asarray(segments))
    return np.rint(np.asarray(counts)).astype(np.int64)


def test_generate_counts_equal_routing_decisions(model):
    free = decode.generate(model, PROMPTS, max_new_tokens=NEW)
    eos = int(free[0, 3])  # row 0 ends at its 4th token (or earlier); row 1 maybe never
    out, routing = decode.generate(model, PROMPTS, max_new_tokens=NEW, eos_id=eos,
                                   return_routing=True)
    assert routing["counts_BLR"].shape == (2, 2, 8)
    for row, prompt in enumerate(PROMPTS):
        generated = [int(t) for t in out[row]]
        ended = generated.index(eos) if eos in generated else None
        # The model read the prompt, then every generated token before the row's eos (the
        # last token of the run is produced but never read).
        fed = generated[:ended] if ended is not None else generated[:len(generated) - 1]
        expected = forward_counts(model, prompt + fed)
        assert routing["tokens_B"][row] == len(prompt) + len(fed)
        np.testing.assert_array_equal(routing["counts_BLR"][row], expected)
        assert (expected.sum(-1) == 2 * (len(prompt) + len(fed))).all()  # top-2 per token
    assert eos in list(out[0][:4])  # row 0 ended early, so some steps counted one row only
    assert out.shape[1] > list(out[0]).index(eos) + 1


def test_subset_counts_are_in_the_checkpoint_numbering(model):
    subset = subset_lib.make_subset([[0, 3, 6], [1, 2, 7]], config=spread_config(),
                                    model=model,
                                    method="manual", data={})
    small, _, _ = extract.extract(model, spread_config(), subset)
    _, cut = decode.generate(small, PROMPTS, max_new_tokens=6, return_routing=True)
    _, masked = decode.generate(model, PROMPTS, max_new_tokens=6, return_routing=True,
                                expert_mask_LR=subset.mask())
    for row in range(len(PROMPTS)):
        expanded = request_log.expand(cut["counts_BLR"][row], subset.layers, 8)
        np.testing.assert_array_equal(expanded, masked["counts_BLR"][row])
        assert expanded[~subset.mask()].sum() == 0


def test_eval_document_counts_equal_routing_decisions(tmp_path):
    """Packed rows hold several documents; each document's counts are its own routing (with
    the eval pool: EMO routing at evaluation)."""
    from emo_jax.data.pipeline import pack_documents
    from emo_jax.evaluation import evaluate
    from emo_jax.modular.runtime import load_model, tokenizer_of
    from emo_jax.model_files import save_model

    config = tiny_config(eval_pool=4)
    path = save_model(str(tmp_path / "m"), random_model(config, 4), config)
    model, config, _ = load_model(path)
    docs = [{"text": t, "domain": d} for t, d in (
        ("The court held it void.", "legal"), ("def f(x): return x", "code"),
        ("A quiet river.", "prose"), ("x = [i * i for i in y]", "code"))]
    result = evaluate(model, config, docs, batch_size=2, routing=True)
    counts, tokens = result["routing"]["counts"], result["routing"]["tokens"]
    assert sorted(counts) == [0, 1, 2, 3]
    packed = list(pack_documents(docs, tokenizer_of(config), config.data.seq_len, 2))
    assert any(len(set(b["document_ids"][r][b["document_ids"][r] >= 0])) > 1
               for b in packed for r in range(2))  # some row packs two documents
    for doc in range(len(docs)):
        ids = np.concatenate([b["tokens"][b["document_ids"] == doc] for b in packed]).tolist()
        assert tokens[doc] == len(ids)
        np.testing.assert_array_equal(counts[doc], forward_counts(model, ids))


def test_generate_cli_appends_one_record_per_request(model, tmp_path):
    from emo_jax.model_files import save_model

    path = save_model(str(tmp_path / "m"), model, spread_config())
    subset = subset_lib.make_subset([[0, 3, 6], [1, 2, 7]], config=spread_config(),
                                    model=model,
                                    method="manual", data={})
    subset_path = subset_lib.save(subset, str(tmp_path / "s.json"))
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"earlier": "record"}) + "\n")  # a log is appended to, never cut
    proc = subprocess.run(
        [sys.executable, "-m", "emo_jax.generate", f"--checkpoint={path}", "--prompt=Hi there",
         "--max_new_tokens=5", "--temperature=0", f"--request_log={log}",
         f"--subset={subset_path}"],
        cwd=th.REPO, env=th.cli_env(devices=1), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    earlier, record = request_log.read(str(log))
    assert earlier == {"earlier": "record"}
    assert record["tool"] == "generate" and record["subset"] == subset_path
    assert record["routed_experts"] == 8 and record["shared_experts"] == 1
    assert record["prompt_tokens"] == len("Hi there")
    assert record["prompt_tokens"] <= record["tokens"] <= record["prompt_tokens"] + 4
    assert [sum(c) for c in record["counts"]] == [2 * record["tokens"]] * 2
    # The subset's experts, under their ids in the checkpoint (the run used 3 of 8 per layer).
    assert np.asarray(record["counts"])[~subset.mask()].sum() == 0
