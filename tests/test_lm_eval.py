"""lm-evaluation-harness adapter (emo_jax/lm_eval_adapter.py, emo_jax/lm_eval.py).

The scoring core runs without the harness: log-likelihoods equal sums of log-softmax computed
here from the model's logits on the concatenated sequence (one document per forward, no
packing), rolling log-likelihood is the document's, greedy generation stops at the stop string,
packing many requests per row changes nothing, and a subset mask changes the answers. With the
harness installed, a local multiple-choice task (YAML + JSONL, no downloads) runs through
`lm_eval.simple_evaluate` and through `python -m emo_jax.lm_eval`.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax import lm_eval_adapter as adapter
from emo_jax.model import decode

from modular_helpers import random_model, tiny_config

SEQ = 48  # tiny_config's data.seq_len
EOS = 2


class CharTokenizer:
    """One id per character (id i <-> chr(0x100 + i)), so every id decodes to one printable
    character; pad 0, bos 1, eos 2 decode to nothing."""

    spec, vocab_size, pad_id, bos_id, eos_id = "chars", 264, 0, 1, EOS

    def encode(self, text):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + int(i)) for i in ids if int(i) > 2)


TOK = CharTokenizer()


def text(ids):
    return "".join(chr(0x100 + i) for i in ids)


def spread_config():
    config = tiny_config()
    config.model.init_std = 0.3  # spread logits: greedy decoding does not repeat one token
    return config


@pytest.fixture(scope="module")
def model():
    return random_model(spread_config(), 5)


@nnx.jit
def _logits(model, tokens_1S, mask_LR):
    return model(tokens_1S, expert_mask_LR=mask_LR).logits_BSV[0]


def reference_logprobs(model, ids, mask=None):
    """float64 log p(ids[t] | ids[:t]) for t >= 1 of one document alone in a row."""
    logits = np.asarray(_logits(model, jnp.asarray([ids], jnp.int32), mask), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))]), \
        np.array([logits[t - 1].argmax() == ids[t] for t in range(1, len(ids))])


def reference_loglikelihood(model, ctx, cont, mask=None):
    ids = ((ctx or [EOS]) + cont)[-(SEQ + 1):]
    logp, greedy = reference_logprobs(model, ids, mask)
    return logp[-len(cont):].sum(), bool(greedy[-len(cont):].all())


def ids_of(seed, n):
    return np.random.default_rng(seed).integers(3, 264, n).tolist()


def test_loglikelihood_is_the_sum_of_log_softmax_of_the_model_logits(model):
    scorer = adapter.Scorer(model, TOK, seq_len=SEQ, batch_size=2)
    cases = [(ids_of(1, 10), ids_of(2, 3)), ([], ids_of(3, 5)), (ids_of(4, 1), ids_of(5, 1)),
             (ids_of(6, 70), ids_of(7, 4)),  # context left-truncated to the seq_len window
             (ids_of(8, 20), ids_of(9, 28)), (ids_of(10, 5), ids_of(11, 12))]
    got = scorer.loglikelihood([(text(c), text(x)) for c, x in cases])
    for (ctx, cont), (logp, greedy) in zip(cases, got):
        ref_logp, ref_greedy = reference_loglikelihood(model, ctx, cont)
        assert logp == pytest.approx(ref_logp, rel=1e-4, abs=1e-3)
        assert greedy == ref_greedy
    assert len({w for _, w in scorer.shapes}) == 1  # one row width for the whole call


def test_greedy_flag_is_true_for_the_models_own_continuation(model):
    ctx = ids_of(12, 9)
    greedy_ids = decode.generate(model, [ctx], max_new_tokens=4)[0].tolist()
    scorer = adapter.Scorer(model, TOK, seq_len=SEQ)
    (logp, greedy), (_, other) = scorer.loglikelihood_tokens(
        [(ctx, greedy_ids), (ctx, greedy_ids[:3] + [(greedy_ids[3] + 1 - 3) % 261 + 3])])
    assert greedy and not other
    assert logp < 0


def test_packing_and_batch_size_change_nothing(model):
    requests = [(ids_of(20 + i, 3 + 5 * i), ids_of(40 + i, 1 + i)) for i in range(8)]
    one = adapter.Scorer(model, TOK, seq_len=SEQ, batch_size=1).loglikelihood_tokens(requests)
    packed = adapter.Scorer(model, TOK, seq_len=SEQ, batch_size=3)
    many = packed.loglikelihood_tokens(requests)
    np.testing.assert_allclose([x for x, _ in one], [x for x, _ in many], rtol=1e-4, atol=1e-3)
    assert [g for _, g in one] == [g for _, g in many]
    assert packed.shapes == {(3, SEQ)}  # the longest request needs 45 of 48 positions


def test_rolling_loglikelihood_is_the_documents(model):
    scorer = adapter.Scorer(model, TOK, seq_len=SEQ)
    short, long = ids_of(60, 30), ids_of(61, 2 * SEQ + 17)
    got_short, got_long, empty = scorer.loglikelihood_rolling([text(short), text(long), ""])
    assert got_short == pytest.approx(reference_logprobs(model, [EOS] + short)[0].sum(),
                                      rel=1e-4, abs=1e-3)
    # Windows of SEQ scored tokens, each after as much context as fits in SEQ inputs.
    full, ref = [EOS] + long, 0.0
    for start in range(1, len(full), SEQ):
        end = min(start + SEQ, len(full))
        window = full[max(0, end - SEQ - 1):end]
        ref += reference_logprobs(model, window)[0][-(end - start):].sum()
    assert got_long == pytest.approx(ref, rel=1e-4, abs=1e-3)
    assert empty == 0.0


def test_generate_until_is_greedy_and_stops_at_the_stop_string(model):
    scorer = adapter.Scorer(model, TOK, seq_len=SEQ, batch_size=4)
    prompts = [ids_of(70, 7), ids_of(71, 7), ids_of(72, 11)]
    free = scorer.generate_until([(text(p), {"until": [], "max_gen_toks": 12})
                                  for p in prompts])
    for p, out in zip(prompts, free):  # rows of equal prompt length share a batch
        ref = decode.generate(model, [p], max_new_tokens=12, eos_id=EOS)[0].tolist()
        ref = ref[:ref.index(EOS)] if EOS in ref else ref
        assert out == TOK.decode(ref)
    assert len(set(free[0])) > 3
    stop = free[0][4]
    cut = free[0][:free[0].index(stop)]
    stopped = scorer.generate_until([(text(prompts[0]), {"until": [stop, "never"],
                                                         "max_gen_toks": 12}),
                                     (text(prompts[0]), {"until": stop, "max_gen_toks": 2})])
    assert stopped == [cut, adapter.cut_at_stop(free[0][:2], [stop])]
    assert len(cut) < len(free[0])


def test_long_prompts_are_left_truncated_for_generation(model):
    scorer = adapter.Scorer(model, TOK, seq_len=SEQ)
    prompt = ids_of(80, 3 * SEQ)
    out, = scorer.generate_until([(text(prompt), {"max_gen_toks": 8})])
    ref = decode.generate(model, [prompt[-(SEQ - 8):]], max_new_tokens=8, eos_id=EOS)[0]
    ref = ref.tolist()
    assert out == TOK.decode(ref[:ref.index(EOS)] if EOS in ref else ref)


def test_a_subset_mask_changes_the_answers(model):
    mask = np.zeros((2, 8), bool)
    mask[:, [0, 3, 5]] = True
    full = adapter.Scorer(model, TOK, seq_len=SEQ)
    masked = adapter.Scorer(model, TOK, seq_len=SEQ, expert_mask_LR=mask)
    ctx, cont = ids_of(90, 12), ids_of(91, 6)
    (a, _), = full.loglikelihood_tokens([(ctx, cont)])
    (b, _), = masked.loglikelihood_tokens([(ctx, cont)])
    assert abs(a - b) > 1e-3
    assert b == pytest.approx(reference_loglikelihood(model, ctx, cont, jnp.asarray(mask))[0],
                              rel=1e-4, abs=1e-3)
    prompt = text(ids_of(92, 8))
    assert (full.generate_until([(prompt, {"max_gen_toks": 10})])
            != masked.generate_until([(prompt, {"max_gen_toks": 10})]))


def test_the_command_line_without_the_harness_says_how_to_install(monkeypatch, capsys):
    from emo_jax import lm_eval as cli

    monkeypatch.setattr(adapter, "_HarnessLM", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--checkpoint=x", "--tasks=t"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install -e '.[lm_eval]'" in err


# --- with the harness ------------------------------------------------------------------------

MC_DOCS = [{"question": "Which letter comes after a?", "choices": [" b", " z", " q"], "label": 0},
           {"question": "Two plus two is", "choices": [" five", " four"], "label": 1},
           {"question": "The sky is", "choices": [" green", " blue", " red", " up"],
            "label": 1}]


def write_task(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (directory / "emo_tiny_mc.yaml").write_text(
        "task: emo_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" \
        "test_split: test\n"
    (directory / "emo_tiny_gen.yaml").write_text(
        "task: emo_tiny_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: \"{{choices[label]}}\"\n"
        "generation_kwargs:\n  until: [\"e\", \"a\"]\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")
    (directory / "emo_tiny_ppl.yaml").write_text(
        "task: emo_tiny_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{question}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    return directory


@pytest.fixture
def harness(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return lm_eval


def test_a_local_task_runs_through_simple_evaluate(harness, model, tmp_path):
    from lm_eval.tasks import TaskManager

    from emo_jax.data import make_tokenizer

    tasks = write_task(tmp_path / "tasks")
    tok = make_tokenizer("byte")
    lm = adapter.EmoJaxLM(scorer=adapter.Scorer(model, tok, seq_len=SEQ))
    results = harness.simple_evaluate(model=lm, tasks=["emo_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(tasks)),
                                      log_samples=True)
    acc = results["results"]["emo_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # Each answer is the choice of highest log-likelihood under the scorer.
    scorer = adapter.Scorer(model, tok, seq_len=SEQ)
    for sample in results["samples"]["emo_tiny_mc"]:
        doc = sample["doc"]
        pairs = [tuple(args.values()) if isinstance(args, dict) else tuple(args)
                 for args in sample["arguments"]]
        assert [p[0] for p in pairs] == [f"Q: {doc['question']}\nA:"] * len(doc["choices"])
        scores = [lp for lp, _ in scorer.loglikelihood(pairs)]
        logged = [float(r[0][0]) for r in sample["resps"]]
        np.testing.assert_allclose(logged, scores, rtol=1e-5, atol=1e-4)
        assert sample["acc"] == float(int(np.argmax(scores)) == doc["label"])


def test_generation_and_rolling_tasks_run_through_simple_evaluate(harness, model, tmp_path):
    from lm_eval.tasks import TaskManager

    from emo_jax.data import make_tokenizer

    tasks = write_task(tmp_path / "tasks")
    scorer = adapter.Scorer(model, make_tokenizer("byte"), seq_len=SEQ)
    results = harness.simple_evaluate(model=adapter.EmoJaxLM(scorer=scorer),
                                      tasks=["emo_tiny_gen", "emo_tiny_ppl"],
                                      task_manager=TaskManager(include_path=str(tasks)),
                                      log_samples=True)
    for sample in results["samples"]["emo_tiny_gen"]:
        prompt = f"Q: {sample['doc']['question']}\nA:"
        want, = scorer.generate_until([(prompt, {"until": ["e", "a"], "max_gen_toks": 6})])
        assert sample["resps"] == [[want]] and "e" not in want and "a" not in want
    for sample in results["samples"]["emo_tiny_ppl"]:
        want, = scorer.loglikelihood_rolling([sample["doc"]["question"]])
        assert float(sample["resps"][0][0]) == pytest.approx(want, rel=1e-5)
    assert results["results"]["emo_tiny_ppl"]["bits_per_byte,none"] > 0


def test_the_command_line_runs_a_local_task_on_a_checkpoint_and_a_subset(harness, tmp_path):
    from emo_jax.model_files import save_model
    from emo_jax.modular import subset as subset_lib

    config = tiny_config()
    model = random_model(config, 6)
    checkpoint = save_model(str(tmp_path / "model"), model, config)
    chosen = subset_lib.make_subset([[0, 2, 4], [1, 3, 5]], config=config, model=model,
                                    method="layerwise", data={"text": "test"})
    subset = subset_lib.save(chosen, str(tmp_path / "subset.json"))
    tasks = write_task(tmp_path / "tasks")
    accs = []
    for extra in ([], [f"--subset={subset}"]):
        out = tmp_path / f"out{len(extra)}"
        proc = subprocess.run(
            [sys.executable, "-m", "emo_jax.lm_eval", f"--checkpoint={checkpoint}", *extra,
             "--tasks=emo_tiny_mc", f"--include_path={tasks}", f"--output_path={out}",
             "--log_samples"],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
            timeout=600, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu",
                              "HF_DATASETS_CACHE": str(tmp_path / "hf"),
                              "HF_DATASETS_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "emo_tiny_mc" in proc.stdout
        result, = out.rglob("results_*.json")
        samples, = out.rglob("samples_emo_tiny_mc_*.jsonl")
        accs.append([json.loads(line)["resps"] for line in samples.read_text().splitlines()])
        assert "acc,none" in json.loads(result.read_text())["results"]["emo_tiny_mc"]
    assert accs[0] != accs[1]  # the subset scores differently
    bad = subprocess.run([sys.executable, "-m", "emo_jax.lm_eval",
                          f"--checkpoint={tmp_path / 'missing'}", "--tasks=emo_tiny_mc"],
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
