"""Tests of emo_jax/data/pipeline.py: packing invariants, determinism, resume, hosts, bad input.

References are computed independently of the pipeline: documents are encoded with
`str.encode('utf-8')` (+8 per byte, eos 2 appended) and cut into pieces by plain slicing.
"""

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from emo_jax.config import ConfigError, default_config
from emo_jax.data import packing
from emo_jax.data.pipeline import (data_stats, fill_ratio, make_eval_batches,
                                   make_train_iterator, pack_documents)
from emo_jax.data.sources import DataError
from emo_jax.data.tokenizers import ByteTokenizer

EOS = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "é", "naïve", "☃", "日本", "x", "\n", "    "]


def make_texts(n, seed=0, max_words=40):
    rng = random.Random(seed)
    texts = [f"doc{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words)))
             for i in range(n)]
    texts[1] = "doc1:" + "z" * (32 - 5 - 1)  # exactly one row once eos is appended
    return texts


def write_jsonl(path, texts, domain="d"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "domain": domain}) + "\n")
    return str(path)


def config(sources, **data):
    c = default_config()
    c.data.train_sources = c.data.eval_sources = sources
    c.data.update(dict(seq_len=32, batch_size=4, num_epochs=1, packing_bins=4, prefetch=0))
    c.data.update(data)
    return c


def ref_ids(text):
    return [b + 8 for b in text.encode("utf-8")] + [EOS]


def ref_pieces(texts, seq_len):
    return collections.Counter(tuple(ids[i:i + seq_len]) for ids in map(ref_ids, texts)
                               for i in range(0, len(ids), seq_len))


def segments(batches):
    """Every segment's tokens, in row order, checking the per-row invariants on the way."""
    out = []
    for batch in batches:
        assert set(batch) == {"tokens", "segment_ids", "positions"}
        for key in batch:
            assert batch[key].dtype == np.int32
        for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
            n = int(seg.max())
            assert (np.unique(seg[seg > 0]) == np.arange(1, n + 1)).all()  # ids 1..n
            assert (np.diff(seg[seg > 0]) >= 0).all()  # in order, contiguous
            assert (seg[np.count_nonzero(seg):] == 0).all()  # padding only at the end
            assert (tokens[seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
            for s in range(1, n + 1):
                assert (pos[seg == s] == np.arange(np.count_nonzero(seg == s))).all()
                out.append(tuple(tokens[seg == s].tolist()))
    return out


def run_epoch(cfg, **kwargs):
    it = make_train_iterator(cfg, process_index=kwargs.pop("process_index", 0),
                             process_count=kwargs.pop("process_count", 1))
    batches = list(it)
    return batches, data_stats(it)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = make_texts(60)
    return texts, write_jsonl(tmp_path_factory.mktemp("pipe") / "docs.jsonl", texts)


@pytest.mark.parametrize("mode", ["first_fit", "best_fit"])
def test_fit_packing_round_trip(corpus, mode):
    texts, path = corpus
    batches, stats = run_epoch(config(path, packing=mode))
    got = segments(batches)
    assert collections.Counter(got) == ref_pieces(texts, 32)  # nothing lost, moved, doubled
    whole = [ByteTokenizer().decode(s) for s in got if s[-1] == EOS and s[:3] == (108, 119, 107)]
    assert sorted(whole) == sorted(t for t in texts if len(ref_ids(t)) <= 32)  # 108.. = "doc"
    assert any(len(ref_ids(t)) > 64 for t in texts)  # pieces of split documents were checked
    # Counts are taken at the restorable position, which may trail the last rows a little.
    assert 0.8 * len(texts) <= stats["documents"] <= len(texts) and stats["bad_records"] == 0


def test_concat_then_split_round_trip(corpus):
    texts, path = corpus
    batches, _ = run_epoch(config(path, packing="concat_then_split"))
    rows = [(tokens, seg) for b in batches for tokens, seg in zip(b["tokens"], b["segment_ids"])]
    segments(batches)  # row invariants
    docs, current = [], []
    for tokens, seg in rows:
        for s in range(1, int(seg.max()) + 1):
            piece = tokens[seg == s].tolist()
            if piece[-1] != EOS:  # a document continued in the next row ends this row
                assert np.flatnonzero(seg == s)[-1] == len(seg) - 1
            current += piece
            if piece[-1] == EOS:
                docs.append(ByteTokenizer().decode(current))
                current = []
    assert not current and sorted(docs) == sorted(texts)
    assert fill_ratio(batches) > 0.95


def test_fit_packing_with_many_pieces_per_document(corpus):
    """Most documents split into several pieces; each must be its own segment, a contiguous
    slice of its document, none lost or duplicated."""
    texts, path = corpus
    batches, _ = run_epoch(config(path, packing="first_fit", seq_len=16))
    assert collections.Counter(segments(batches)) == ref_pieces(texts, 16)


def test_determinism_and_seed(corpus):
    _, path = corpus
    first = [run_epoch(config(path, seed=3))[0] for _ in range(2)]
    other = run_epoch(config(path, seed=4))[0]
    for a, b in zip(*first):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert len(first[0]) == len(first[1])
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first[0], other))
    assert collections.Counter(segments(first[0])) == collections.Counter(segments(other))


def test_epochs_repeat_and_reshuffle(corpus):
    texts, path = corpus
    it = make_train_iterator(config(path, num_epochs=0, packing="concat_then_split"),
                             process_index=0, process_count=1)
    docs, current = [], []
    while len(docs) < 2 * len(texts):
        b = next(it)
        for tokens, seg in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, int(seg.max()) + 1):
                current += tokens[seg == s].tolist()
                if current[-1] == EOS:
                    docs.append(ByteTokenizer().decode(current))
                    current = []
    assert sorted(docs[:len(texts)]) == sorted(texts)
    assert sorted(docs[len(texts):2 * len(texts)]) == sorted(texts)
    assert docs[:len(texts)] != docs[len(texts):2 * len(texts)]  # each epoch reshuffled
    assert data_stats(it)["documents"] >= 2 * len(texts)


def test_two_hosts_disjoint_and_complete(tmp_path):
    texts = [f"host doc {i} " + "w" * (i % 7) for i in range(37)]  # all shorter than a row
    path = write_jsonl(tmp_path / "h.jsonl", texts)
    got = []
    for host in range(2):
        batches, _ = run_epoch(config(path, batch_size=4), process_index=host, process_count=2)
        assert all(b["tokens"].shape == (2, 32) for b in batches)
        got.append(collections.Counter(ByteTokenizer().decode(s) for s in segments(batches)))
    assert not set(got[0]) & set(got[1])
    assert got[0] + got[1] == collections.Counter(texts)
    with pytest.raises(ConfigError, match="divisible"):
        make_train_iterator(config(path, batch_size=3), process_index=0, process_count=2)


def test_mixing_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(50)])
    it = make_train_iterator(config(f"{a}@3,{b}@1", num_epochs=0, packing="first_fit"),
                             process_index=0, process_count=1)
    firsts = [ByteTokenizer().decode(s)[0] for _ in range(40) for s in segments([next(it)])]
    share = firsts.count("a") / len(firsts)
    assert 0.7 < share < 0.8, share


RESUME_CASES = {"first_fit": 0, "concat_then_split": 0, "best_fit": 2}  # packing: workers
RESUME_SCRIPT = """
import json, sys
import numpy as np
from absl import flags
from ml_collections import ConfigDict
from emo_jax.data.pipeline import make_train_iterator, data_stats

if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # Grain worker processes read absl flags
    phase, out = sys.argv[1], sys.argv[2]
    for packing, workers in json.loads(sys.argv[3]).items():
        cfg = ConfigDict(json.load(open(out + ".config.json")))
        cfg.data.update(packing=packing, worker_count=workers)
        it = make_train_iterator(cfg, process_index=0, process_count=1)
        name = f"{out}.{packing}"
        if phase == "save":
            for _ in range(7):
                next(it)
            json.dump(it.get_state(), open(name + ".state.json", "w"))
        else:
            it.set_state(json.load(open(name + ".state.json")))
        stats = data_stats(it)
        batches = [next(it) for _ in range(5)]
        np.savez(f"{name}.{phase}.npz",
                 **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
        json.dump(stats, open(f"{name}.{phase}.stats.json", "w"))
        it.close()
"""


def test_resume_in_fresh_process(corpus, tmp_path):
    """Save the state after 7 batches and record the next 5; a fresh process restores the
    state (through JSON, as Orbax stores it) and must produce the same 5 batches."""
    _, path = corpus
    out = str(tmp_path / "run")
    (tmp_path / "run.config.json").write_text(config(path, num_epochs=0, prefetch=2).to_json())
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    for phase in ("save", "restore"):
        proc = subprocess.run([sys.executable, str(tmp_path / "resume.py"), phase, out,
                               json.dumps(RESUME_CASES)], env=env, timeout=180,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for mode, workers in RESUME_CASES.items():
        saved, restored = (np.load(f"{out}.{mode}.{p}.npz") for p in ("save", "restore"))
        assert sorted(saved.files) == sorted(restored.files) and len(saved.files) == 15
        for key in saved.files:
            np.testing.assert_array_equal(saved[key], restored[key], err_msg=mode)
        stats = [json.load(open(f"{out}.{mode}.{p}.stats.json")) for p in ("save", "restore")]
        assert stats[0] == stats[1] and stats[0]["documents"] > 0  # counts resume too
        state = json.load(open(f"{out}.{mode}.state.json"))
        assert ("iterators_in_use_states" in json.dumps(state)) == (workers > 0), mode


def test_bad_records_skipped_and_counted(tmp_path):
    good = ["first good document", "second good document", "third good document"]
    lines = [json.dumps({"text": good[0]}).encode(), b"{not json",
             json.dumps({"body": "x"}).encode(),
             json.dumps({"text": "   \n"}).encode(), b'{"text": "caf\xe9"}',
             json.dumps({"text": 7}).encode(), json.dumps({"text": good[1]}).encode(),
             b'{"text": "lone \\ud800 surrogate"}', b"", json.dumps({"text": good[2]}).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    batches, _ = run_epoch(config(str(path)))
    assert sorted(ByteTokenizer().decode(s) for s in segments(batches)) == sorted(good)

    # Over many epochs (no shuffle), every epoch adds 3 documents and these bad records:
    per_epoch = {"bad_invalid_json": 1, "bad_missing_text": 2, "bad_empty": 1, "bad_not_utf8": 2}
    it = make_train_iterator(config(str(path), num_epochs=0, shuffle=False), process_index=0,
                             process_count=1)
    for _ in range(30):
        next(it)
    stats = data_stats(it)
    epochs = stats["documents"] // 3
    assert epochs >= 10
    for key, count in per_epoch.items():
        assert epochs * count <= stats[key] <= (epochs + 1) * count, (key, stats)
    assert stats["bad_records"] == sum(stats[k] for k in per_epoch)

    with pytest.raises(DataError, match="bad.jsonl.*record 1"):
        list(make_train_iterator(config(str(path), on_bad_record="error", shuffle=False),
                                 process_index=0, process_count=1))


def test_document_filter_counts_exactly():
    import grain
    items = [{"tokens": np.arange(5, dtype=np.int32)}, {"bad": "empty", "where": "w"},
             {"bad": "not_utf8", "where": "w"}, {"tokens": np.arange(40, dtype=np.int32)}]
    it = iter(packing.DocumentFilterIterDataset(grain.MapDataset.source(items).to_iter_dataset(),
                                                on_bad_record="skip", max_consecutive_bad=9,
                                                seq_len=8))
    assert len(list(it)) == 2
    assert data_stats(it) == {"documents": 2, "tokens": 45, "split_documents": 1,
                              "bad_invalid_json": 0, "bad_missing_text": 0, "bad_empty": 1,
                              "bad_not_utf8": 1, "bad_corrupt_file": 0, "bad_records": 2}


def test_source_without_documents_is_an_error(tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_text("{oops\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="allbad.jsonl' has no valid document"):
        make_train_iterator(config(str(path), num_epochs=0), process_index=0, process_count=1)
    one = write_jsonl(tmp_path / "one.jsonl", ["only document"])
    with pytest.raises(DataError, match="for host 1 of 2"):
        make_train_iterator(config(one), process_index=1, process_count=2)


def test_endless_bad_stream_stops():
    import grain
    ds = grain.MapDataset.source([{"bad": "empty", "where": "x (record 0)"}]).repeat()
    it = iter(packing.DocumentFilterIterDataset(ds.to_iter_dataset(), on_bad_record="skip",
                                                max_consecutive_bad=50, seq_len=8))
    with pytest.raises(DataError, match="last 51 records were all bad"):
        next(it)


def test_eval_batches_deterministic_and_split_over_hosts(corpus):
    texts, path = corpus
    cfg = config(path, batch_size=4)
    full = make_eval_batches(cfg, process_index=0, process_count=1)
    assert collections.Counter(segments(full)) == ref_pieces(texts, 32)
    again = make_eval_batches(cfg, process_index=0, process_count=1)
    halves = [make_eval_batches(cfg, process_index=i, process_count=2) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(full)
    for f, a, h0, h1 in zip(full, again, *halves):
        np.testing.assert_array_equal(f["tokens"], a["tokens"])
        np.testing.assert_array_equal(f["tokens"], np.concatenate([h0["tokens"], h1["tokens"]]))
    assert len(make_eval_batches(cfg, max_batches=2, process_index=0, process_count=1)) == 2


def test_pack_documents_document_ids():
    texts = make_texts(25, seed=5, max_words=30)
    tok = ByteTokenizer()
    for mode in ("first_fit", "concat_then_split"):
        batches = list(pack_documents([{"text": t} for t in texts], tok, 32, 3, packing=mode))
        pieces = collections.defaultdict(list)
        for b in batches:
            assert b["tokens"].shape == b["document_ids"].shape == (3, 32)
            assert ((b["document_ids"] == -1) == (b["segment_ids"] == 0)).all()
            for tokens, seg, doc in zip(b["tokens"], b["segment_ids"], b["document_ids"]):
                for s in range(1, int(seg.max()) + 1):
                    assert len(set(doc[seg == s].tolist())) == 1
                    pieces[int(doc[seg == s][0])].append(tokens[seg == s].tolist())
        assert sorted(pieces) == list(range(len(texts)))
        for i, text in enumerate(texts):
            assert sorted(map(tuple, pieces[i])) == sorted(
                tuple(ref_ids(text)[j:j + 32]) for j in range(0, len(ref_ids(text)), 32)
            ) if mode == "first_fit" else sum(pieces[i], []) == ref_ids(text)
    assert list(pack_documents([], tok, 32, 3)) == []


def test_bundled_corpus_default_trains():
    cfg = default_config()
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    it.close()
    assert batches[0]["tokens"].shape == (16, 256)
    assert fill_ratio(batches) > 0.9
    assert int(max(b["tokens"].max() for b in batches)) < cfg.model.vocab_size
    ev = make_eval_batches(cfg, max_batches=2, process_index=0, process_count=1)
    assert len(ev) == 2 and ev[0]["tokens"].shape == (16, 256)


def test_orbax_checkpoint_of_the_iterator(corpus, tmp_path):
    """The training loop stores the iterator with grain.checkpoint.CheckpointSave in Orbax."""
    import grain
    import orbax.checkpoint as ocp
    _, path = corpus
    cfg = config(path, num_epochs=0)
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    for _ in range(4):
        next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = make_train_iterator(cfg, process_index=0, process_count=1)
    restored = mngr.restore(4, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))["data_iter"]
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    mngr.close()
