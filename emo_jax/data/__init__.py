"""Text in, packed batches out: sources, tokenizers, the Grain pipeline and a bundled corpus.

  sources.py          spec strings -> sources of documents {'text', 'domain'}; read_documents
  records.py          the sources: JSONL, text files, ArrayRecord, TFDS; bad-record markers
  tokenizers.py       byte-level (default), SentencePiece, Hugging Face tokenizer.json
  packing.py          tokenize, count bad records, split, pack rows, batch (Grain stages)
  pipeline.py         make_train_iterator (resumable, per host), make_eval_batches, pack_documents
  train_tokenizer.py  CLI: train a SentencePiece model on a spec
  build_corpus.py     rebuilds corpus/ (the bundled multi-domain corpus) from Debian/PyPI files

Batches are dicts of int32 [B, S] arrays `tokens`, `segment_ids` (0 = padding, 1..n = the
documents of a row, in order) and `positions` (restart at 0 in every segment).
"""

from emo_jax.data.packing import data_stats, fill_ratio
from emo_jax.data.pipeline import make_eval_batches, make_train_iterator, pack_documents
from emo_jax.data.sources import DataError, read_documents
from emo_jax.data.tokenizers import check_vocab, make_tokenizer

__all__ = [
    "DataError", "check_vocab", "data_stats", "fill_ratio", "make_eval_batches",
    "make_tokenizer", "make_train_iterator", "pack_documents", "read_documents",
]
