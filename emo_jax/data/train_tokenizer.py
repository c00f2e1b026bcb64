"""CLI: train a SentencePiece model on the documents of a sources spec.

    python -m emo_jax.data.train_tokenizer --output=/tmp/sp8k --vocab_size=8000 \
        [--sources=''] [--model_type=unigram] [--max_chars=20000000]

writes /tmp/sp8k.model and /tmp/sp8k.vocab; train with `--config.data.tokenizer=
sentencepiece:/tmp/sp8k.model --config.model.vocab_size=8000`. `--sources` uses the spec
grammar of emo_jax/data/sources.py ('' = the bundled corpus's train split).

The model keeps the byte tokenizer's special layout (pad 0, bos 1, eos 2, unk 3), falls back to
bytes for unseen characters and does not normalise text, so decode(encode(text)) == text for
any UTF-8 text, code indentation included. SentencePiece trains on lines: documents are fed
line by line (newlines come back through byte fallback).
"""

from __future__ import annotations

import os
import random
import sys

import sentencepiece as spm
from absl import app, flags

from emo_jax.data.sources import read_documents

def training_lines(docs: list[dict], max_chars: int, seed: int) -> list[str]:
    """Non-blank lines of the documents, from a seeded sample of at most `max_chars`."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    lines, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        for line in docs[i]["text"].splitlines():
            if line.strip():
                lines.append(line[:4096])
                total += len(line)
    return lines


def train(sources: str, output: str, vocab_size: int, *, model_type: str = "unigram",
          text_field: str = "text", max_chars: int = 20_000_000, seed: int = 0) -> str:
    """Trains and writes `output`.model / .vocab; returns the .model path."""
    lines = training_lines(read_documents(sources or "bundled:train", text_field), max_chars, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=output, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=16384, minloglevel=2, num_threads=os.cpu_count() or 1)
    return output + ".model"


def _define_flags():
    """CLI flags, defined only when run as a program (importing `train` defines none)."""
    flags.DEFINE_string("sources", "", "Sources spec to train on ('' = bundled:train).")
    flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model, PREFIX.vocab.")
    flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, specials included.")
    flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "Algorithm.")
    flags.DEFINE_string("text_field", "text", "JSON key holding the text.")
    flags.DEFINE_integer("max_chars", 20_000_000, "Characters of text sampled at most.")
    flags.DEFINE_integer("seed", 0, "Sampling seed for --max_chars.")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.output:
        raise app.UsageError("--output is required (a path prefix for .model and .vocab)")
    try:
        path = train(f.sources, f.output, f.vocab_size, model_type=f.model_type,
                     text_field=f.text_field, max_chars=f.max_chars, seed=f.seed)
    except RuntimeError as e:  # SentencePiece's own errors, e.g. a vocabulary too large
        sys.exit(f"train_tokenizer: SentencePiece training failed: {str(e).splitlines()[-1]}")
    print(f"wrote {path} ({f.vocab_size} pieces); use "
          f"--config.data.tokenizer=sentencepiece:{path} --config.model.vocab_size={f.vocab_size}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
