"""Tests of emo_jax/data/tokenizers.py and the SentencePiece training CLI."""

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from emo_jax.config import ConfigError, default_config
from emo_jax.data.tokenizers import ByteTokenizer, check_vocab, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ["", "plain ascii", "tabs\tand\nnewlines\n\n  indented:\n    x = 1  # é",
           "日本語 ☃ 😀 naïve café", "def f(x):\r\n    return {'a': [1, 2.5e-3]}"]


def random_text(rng, n):
    alphabet = "abcxyz \n\t{}()=é☃日😀"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_byte_tokenizer_layout_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 264)
    assert tok.vocab_size == default_config().model.vocab_size
    rng = random.Random(0)
    for text in SAMPLES + [random_text(rng, 200) for _ in range(20)]:
        ids = tok.encode(text)
        assert ids == [b + 8 for b in text.encode("utf-8")]  # independent reference
        assert tok.encode_array(text).dtype == np.int32
        assert tok.decode(ids) == text
        assert tok.decode([1] + ids + [2, 0, 0]) == text  # specials are not text
    assert tok.spec == "byte" and make_tokenizer("byte").encode("A") == [65 + 8]


def test_bad_specs_and_vocab_check(tmp_path):
    for spec in ("bytes", "sentencepiece:", "hf", "tiktoken:x"):
        with pytest.raises(ConfigError, match="data.tokenizer"):
            make_tokenizer(spec)
    with pytest.raises(ConfigError, match="no.model' does not exist"):
        make_tokenizer(f"sentencepiece:{tmp_path}/no.model")
    check_vocab(ByteTokenizer(), 264)
    check_vocab(ByteTokenizer(), 512)  # a padded embedding table is fine
    with pytest.raises(ConfigError, match=r"model.vocab_size \(256\) is smaller than the 264 ids "
                       "of tokenizer 'byte'; set model.vocab_size >= 264"):
        check_vocab(ByteTokenizer(), 256)
    from emo_jax.data.pipeline import make_train_iterator
    c = default_config()
    c.model.vocab_size = 200  # the pipeline refuses before anything reaches the embedding
    with pytest.raises(ConfigError, match=r"model.vocab_size \(200\)"):
        make_train_iterator(c, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """Trains through the CLI, in a subprocess, on a tiny JSONL corpus."""
    tmp = tmp_path_factory.mktemp("sp")
    rng = random.Random(1)
    words = ["the", "expert", "router", "token", "document", "pool", "def", "return", "é", "日本"]
    words += words * 20 + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                   for _ in range(rng.randint(2, 7))) for _ in range(200)]
    with open(tmp / "tiny.jsonl", "w") as f:
        for _ in range(300):
            text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                             for _ in range(rng.randint(1, 5)))
            f.write(json.dumps({"body": text}) + "\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "emo_jax.data.train_tokenizer",
                           f"--sources={tmp / 'tiny.jsonl'}", "--text_field=body",
                           f"--output={tmp / 'out' / 'sp'}", "--vocab_size=400"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sentencepiece:" in proc.stdout
    return str(tmp / "out" / "sp.model")


def test_sentencepiece_cli_model(sp_model):
    tok = make_tokenizer(f"sentencepiece:{sp_model}")
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (400, 0, 1, 2)
    rng = random.Random(2)
    for text in SAMPLES + [random_text(rng, 100) for _ in range(10)]:
        ids = tok.encode(text)
        assert all(3 <= i < 400 for i in ids)  # never a special inside text
        assert tok.decode(ids) == text  # identity normalisation + byte fallback
    assert len(tok.encode("the expert router")) <= 6  # it learned word pieces
    clone = pickle.loads(pickle.dumps(tok))  # Grain workers rebuild it from its spec
    assert clone.encode("document pool") == tok.encode("document pool")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_vocab(tok, 264)


def test_sentencepiece_in_pipeline(sp_model, tmp_path):
    from emo_jax.data.pipeline import make_train_iterator
    texts = [f"the document {i} goes to expert {i % 3}" for i in range(20)]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in texts))
    c = default_config()
    c.data.update(train_sources=str(tmp_path / "d.jsonl"), tokenizer=f"sentencepiece:{sp_model}",
                  seq_len=64, batch_size=2, num_epochs=1)
    c.model.vocab_size = 400
    tok = make_tokenizer(c.data.tokenizer)
    segments = [t[s == k] for b in make_train_iterator(c, process_index=0, process_count=1)
                for t, s in zip(b["tokens"], b["segment_ids"]) for k in range(1, s.max() + 1)]
    assert all(seg[-1] == 2 for seg in segments)
    assert sorted(tok.decode(seg) for seg in segments) == sorted(texts)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(SAMPLES * 20, trainer=trainer)
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    for spec in (f"hf:{tmp_path}/tok/tokenizer.json", f"hf:{tmp_path}/tok"):
        tok = make_tokenizer(spec)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.vocab_size == hf.get_vocab_size()
        for text in SAMPLES:
            assert tok.decode(tok.encode(text)) == text
        assert pickle.loads(pickle.dumps(tok)).encode("café") == tok.encode("café")
    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.train_from_iterator(SAMPLES, trainer=tokenizers.trainers.BpeTrainer(vocab_size=50))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ConfigError, match="none of the end-of-document tokens"):
        make_tokenizer(f"hf:{tmp_path}/bare.json")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        make_tokenizer(f"hf:{tmp_path}/missing")
