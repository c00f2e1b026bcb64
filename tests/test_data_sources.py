"""Tests of emo_jax/data/sources.py: spec grammar, every source kind, bad records, TFDS, corpus."""

import collections
import gzip
import json
import os
import pickle

import numpy as np
import pytest

from emo_jax.config import ConfigError, default_config
from emo_jax.data import sources
from emo_jax.data.pipeline import make_train_iterator
from emo_jax.data.sources import (BUNDLED_DIR, DataError, SourceEntry, open_source, parse_spec,
                                  read_documents)
from emo_jax.data.tokenizers import ByteTokenizer


def docs_of(source):
    return [source[i] for i in range(len(source))]


def test_parse_spec():
    assert parse_spec("") == [SourceEntry("bundled:train", 1.0)]
    assert parse_spec("", default="bundled:eval") == [SourceEntry("bundled:eval", 1.0)]
    assert parse_spec(" a.jsonl@2.5, dir/*.txt ,tfds:x/y:1.0.0:train[:50%]@1e-1") == [
        SourceEntry("a.jsonl", 2.5), SourceEntry("dir/*.txt", 1.0),
        SourceEntry("tfds:x/y:1.0.0:train[:50%]", 0.1)]
    assert parse_spec("me@host/a.jsonl") == [SourceEntry("me@host/a.jsonl", 1.0)]
    with pytest.raises(ConfigError, match="data.train_sources.*weights must be > 0"):
        parse_spec("a.jsonl@0", key="data.train_sources")
    with pytest.raises(ConfigError, match="empty entry"):
        parse_spec("a.jsonl,,b.jsonl")
    assert sources._split_tfds("tfds:name/cfg:1.0.0:train[:50%]") == ("name/cfg:1.0.0",
                                                                       "train[:50%]")
    with pytest.raises(DataError, match="must name a split"):
        sources._split_tfds("tfds:name")


def test_jsonl_plain_gzip_and_crlf(tmp_path):
    rows = [{"text": "one", "domain": "a"}, {"text": "two ☃"}, {"text": "three", "domain": 5}]
    lines = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\r\n"
    (tmp_path / "a.jsonl").write_bytes(lines.encode())
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"body": r["text"]}) for r in rows))
    expect = [{"text": "one", "domain": "a"}, {"text": "two ☃", "domain": None},
              {"text": "three", "domain": None}]
    assert docs_of(open_source(str(tmp_path / "a.jsonl"))) == expect
    gz = open_source(str(tmp_path / "b.jsonl.gz"), text_field="body")
    assert [d["text"] for d in docs_of(gz)] == ["one", "two ☃", "three"]
    import pickle  # workers receive sources by pickle: handles must not travel
    assert docs_of(pickle.loads(pickle.dumps(gz))) == docs_of(gz)


def test_text_files_folder_glob_and_mixed_kinds(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.txt").write_text("first file\n")
    (tmp_path / "d" / "sub" / "y.md").write_text("second file")
    (tmp_path / "d" / ".hidden").write_text("never read")
    (tmp_path / "d" / "z.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "d" / "bin.dat").write_bytes(b"\xff\xfe bytes")
    folder = docs_of(open_source(str(tmp_path / "d")))
    assert [d.get("text") for d in folder] == ["from jsonl", None, "second file", "first file\n"]
    assert folder[1]["bad"] == "not_utf8" and "bin.dat" in folder[1]["where"]
    assert [d["text"] for d in docs_of(open_source(str(tmp_path / "d" / "*.txt")))] == [
        "first file\n"]
    single = tmp_path / "d" / "x.txt"
    assert read_documents(str(single)) == [{"text": "first file\n", "domain": None}]


def test_array_record_json_and_raw(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    paths = {}
    for kind, records in {"json": [json.dumps({"text": "j1", "domain": "q"}).encode(), b"{bad",
                                   json.dumps({"text": "j2"}).encode()],
                          "raw": ["raw one".encode(), b"\xc3", "raw ☃".encode()]}.items():
        paths[kind] = str(tmp_path / f"{kind}.array_record")
        writer = ArrayRecordWriter(paths[kind], "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()
    json_docs = docs_of(open_source(paths["json"]))
    assert json_docs[0] == {"text": "j1", "domain": "q"} and json_docs[2]["text"] == "j2"
    assert json_docs[1]["bad"] == "invalid_json"
    raw_docs = docs_of(open_source(paths["raw"]))
    assert raw_docs[0]["text"] == "raw one" and raw_docs[2]["text"] == "raw ☃"
    assert raw_docs[1]["bad"] == "not_utf8"


def test_bad_record_reasons(tmp_path):
    lines = [b"{oops", b"[1, 2]", json.dumps({"title": "x"}).encode(),
             json.dumps({"text": None}).encode(), json.dumps({"text": " \n\t"}).encode(),
             b'{"text": "\xff"}', b'{"text": "\\udc80"}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines))
    reasons = [d["bad"] for d in docs_of(open_source(str(tmp_path / "bad.jsonl")))]
    assert reasons == ["invalid_json", "invalid_json", "missing_text", "missing_text", "empty",
                       "not_utf8", "not_utf8"]
    with pytest.raises(DataError, match="bad.jsonl' holds no valid document"):
        read_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match=r"bad record \(invalid_json\) at .*bad.jsonl \(record 0"):
        read_documents(str(tmp_path / "bad.jsonl"), on_bad_record="error")


def _truncated_gzip(path, n_lines=40, keep=0.6):
    lines = [json.dumps({"text": f"document {i} " + "words " * (i % 5 + 2)})
             for i in range(n_lines)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path.write_bytes(data[:int(len(data) * keep)])
    return lines


def test_truncated_or_non_gzip_file_is_one_bad_record_naming_the_place(tmp_path):
    lines = _truncated_gzip(tmp_path / "cut.jsonl.gz")
    source = open_source(str(tmp_path / "cut.jsonl.gz"))
    docs = docs_of(source)
    good, last = docs[:-1], docs[-1]
    assert 0 < len(good) < len(lines) and all("bad" not in d for d in good)
    assert [d["text"] for d in good] == [json.loads(x)["text"] for x in lines[:len(good)]]
    assert last["bad"] == "corrupt_file"
    assert f"cut.jsonl.gz (record {len(good)}, line {len(good) + 1}, byte offset" in last["where"]
    assert "truncated" in last["where"]
    assert docs_of(pickle.loads(pickle.dumps(source))) == docs  # Grain workers reopen it
    assert len(read_documents(str(tmp_path / "cut.jsonl.gz"))) == len(good)  # skipped, counted
    with pytest.raises(DataError, match=r"bad record \(corrupt_file\) at .*cut.jsonl.gz "
                                        rf"\(record {len(good)}, line {len(good) + 1}"):
        read_documents(str(tmp_path / "cut.jsonl.gz"), on_bad_record="error")

    (tmp_path / "plain.jsonl.gz").write_text(lines[0] + "\n")
    with pytest.raises(DataError, match=r"plain.jsonl.gz' holds no valid document .*corrupt_file "
                                        r"at .*plain.jsonl.gz \(record 0, line 1.*not gzip data"):
        read_documents(str(tmp_path / "plain.jsonl.gz"))
    c = default_config()
    c.data.train_sources = str(tmp_path / "plain.jsonl.gz")
    with pytest.raises(DataError, match="plain.jsonl.gz' has no valid document.*not gzip data"):
        make_train_iterator(c, process_index=0, process_count=1)


def test_truncated_gzip_in_training_is_counted_every_epoch(tmp_path):
    from emo_jax.data.packing import data_stats, latest_bad_record

    _truncated_gzip(tmp_path / "cut.jsonl.gz", n_lines=12)
    c = default_config()
    c.data.train_sources, c.data.shuffle, c.data.seq_len = str(tmp_path / "cut.jsonl.gz"), False, 64
    c.data.batch_size = 2
    it = make_train_iterator(c, process_index=0, process_count=1)
    for _ in range(20):
        next(it)
    stats = data_stats(it)
    assert stats["bad_corrupt_file"] >= 2 and stats["bad_records"] == stats["bad_corrupt_file"]
    assert "corrupt_file at" in latest_bad_record(it) and "cut.jsonl.gz" in latest_bad_record(it)
    c.data.on_bad_record = "error"
    with pytest.raises(DataError, match=r"corrupt_file\) at .*cut.jsonl.gz \(record \d+, line"):
        for _ in make_train_iterator(c, process_index=0, process_count=1):
            pass


def test_missing_paths_name_the_path(tmp_path):
    for target in (str(tmp_path / "nope.jsonl"), str(tmp_path / "nothing" / "*.txt"),
                   "bundled:test"):
        with pytest.raises(DataError, match=target.replace("*", r"\*").replace(".", r"\.")):
            open_source(target)
    c = default_config()
    c.data.train_sources = f"{tmp_path}/absent.jsonl@2"
    with pytest.raises(DataError, match="absent.jsonl' does not exist"):
        make_train_iterator(c, process_index=0, process_count=1)


# --------------------------------------------------------------------------- TFDS

def _tiny_tfds(data_dir, texts):
    import tensorflow_datasets as tfds

    class TinyDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(), "domain": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(texts)}

        def _generate_examples(self, items):
            for i, text in enumerate(items):
                yield i, {"text": text, "domain": f"dom{i % 2}"}

    TinyDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_array_record_source_through_pipeline(tmp_path):
    texts = [f"tfds document {i} ☃" + "y" * i for i in range(30)]
    _tiny_tfds(tmp_path, texts)
    docs = read_documents("tfds:tiny_docs:train", tfds_data_dir=str(tmp_path))
    assert sorted(d["text"] for d in docs) == sorted(texts)  # TFDS stores them shuffled
    assert all(d["domain"] == f"dom{texts.index(d['text']) % 2}" for d in docs)
    assert len(read_documents("tfds:tiny_docs:train[:10]", tfds_data_dir=str(tmp_path))) == 10

    c = default_config()
    c.data.update(train_sources="tfds:tiny_docs:train", tfds_data_dir=str(tmp_path), seq_len=64,
                  batch_size=2, num_epochs=1, packing="first_fit")
    it = make_train_iterator(c, process_index=0, process_count=1)
    segs = [tuple(t[s == k]) for b in it for t, s in zip(b["tokens"], b["segment_ids"])
            for k in range(1, int(s.max()) + 1)]
    assert sorted(ByteTokenizer().decode(s) for s in segs) == sorted(texts)

    with pytest.raises(DataError, match="TFDS dataset 'no_such_dataset_xyz' was not found"):
        read_documents("tfds:no_such_dataset_xyz:train", tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="'mnist' split 'train' cannot be read"):
        read_documents("tfds:mnist:train", tfds_data_dir=str(tmp_path))


# --------------------------------------------------------------------------- bundled corpus

def test_bundled_corpus():
    sizes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(BUNDLED_DIR)
                for f in files)
    assert sizes < 10e6
    splits = {}
    for split in ("train", "eval"):
        with gzip.open(os.path.join(BUNDLED_DIR, f"{split}.jsonl.gz"), "rt") as f:
            splits[split] = [json.loads(line) for line in f]
    train, evals = splits["train"], splits["eval"]
    domains = collections.Counter(d["domain"] for d in train)
    assert len(domains) >= 5 and min(domains.values()) >= 100, domains
    assert set(collections.Counter(d["domain"] for d in evals)) == set(domains)
    assert all(d["source"] and d["license"] and 0 < len(d["text"]) <= 4200 for d in train)
    lengths = np.array([len(d["text"]) for d in train])
    assert lengths.min() < 600 and lengths.max() > 3500  # varied lengths
    assert len({d["text"] for d in train}) == len(train)
    prose_free = {d["source"] for d in evals if d["domain"] != "prose"}
    assert not prose_free & {d["source"] for d in train}  # eval files never seen in training
    assert read_documents("")[0] == {"text": evals[0]["text"], "domain": evals[0]["domain"]}
    with open(os.path.join(BUNDLED_DIR, "README.md")) as f:
        readme = f.read()
    assert "license" in readme.lower() and "python -m emo_jax.data.build_corpus" in readme
