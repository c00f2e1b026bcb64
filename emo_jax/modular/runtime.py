"""How the modular tools load a model and turn text into batches.

The tools (select, extract, analyze, generate) run a model on one device: `load_model` restores
any checkpoint `restore_model` accepts (training workdir, checkpoints/<step>, model directory)
onto a one-device mesh. Text becomes batches in the format of docs/METHOD.md §7 (`tokens`,
`segment_ids`, `positions`, int32 [B, S]) through the data package's packer, so a document is
seen exactly as evaluation sees it (ending in eos, split into segments of at most seq_len).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType

from emo_jax import parallel
from emo_jax.model_files import restore_model
from emo_jax.data import DataError, make_tokenizer, pack_documents, read_documents


def load_model(path: str, step: int | None = None):
    """(model, config, metadata) of a checkpoint, parameters on the first device."""
    mesh = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    return restore_model(path, step=step, mesh=mesh)


def tokenizer_of(config):
    return make_tokenizer(config.data.tokenizer)


def read_texts(config, *, data: str | None = None, text: str | None = None,
               max_docs: int | None = None) -> tuple[list[dict], dict]:
    """Documents `{'text', 'domain'}` from a data spec or one literal text, and a description of
    them for the subset file."""
    if text is not None:
        if not text.strip():
            raise DataError("the calibration text (--text) is empty")
        return [{"text": text, "domain": None}], {"text": text[:200], "documents": 1}
    if not data:
        raise DataError("give calibration data: --data=PATH (JSONL, text file, folder or "
                        "spec) or --text=\"...\"")
    docs = read_documents(data, config.data.text_field, max_documents=max_docs)
    return docs, {"source": data, "documents": len(docs), "max_docs": max_docs}


def document_batches(docs, tokenizer, seq_len: int, batch_size: int = 8,
                     boundary: str = "eos_closes") -> list[dict]:
    """Packed batches of `docs` (every token of every document), with `document_ids`;
    `boundary`: the model's `data.boundary` (where each document's eos goes, as in training)."""
    return list(pack_documents(docs, tokenizer, seq_len, batch_size, boundary=boundary))


def prompt_ids(tokenizer, text: str, boundary: str = "eos_closes") -> list[int]:
    """Token ids of a prompt to be continued: a model trained with `data.boundary='eos_opens'`
    saw every document start with eos, so its prompts do too."""
    ids = [int(t) for t in tokenizer.encode(text)]
    return [int(tokenizer.eos_id)] + ids if ids and boundary == "eos_opens" else ids


def prompt_batch(ids) -> dict:
    """One row holding one document of the given ids (no eos: a prompt to be continued)."""
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    return {"tokens": ids, "segment_ids": np.ones_like(ids),
            "positions": np.arange(ids.shape[1], dtype=np.int32)[None]}


def leading_tokens_batches(docs, tokenizer, length: int, batch_size: int = 16) -> list[dict]:
    """One document per row, its first `length` tokens (shorter ones padded): for looking at the
    beginning of every document, whatever the packer would do with the rest."""
    batches = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        document_ids = np.full((batch_size, length), -1, np.int32)
        for row, doc in enumerate(chunk):
            ids = tokenizer.encode_array(doc["text"])[:length]
            tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
            document_ids[row, :len(ids)] = start + row
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape) * segments
        batches.append({"tokens": tokens, "segment_ids": segments,
                        "positions": np.ascontiguousarray(positions),
                        "document_ids": document_ids})
    return batches
