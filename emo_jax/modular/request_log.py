"""Request logs: which experts of every layer served each request (generate) or document (eval).

One JSON object per line, appended to the file (a log is never truncated or rewritten):

    {"tool": "generate" | "eval", "time": "2026-...", "checkpoint": "/abs/path",
     "request": 0,                    # generate: the request's index in this run
     "document": 12, "domain": "...", # eval: the document's index in the data, and its domain
     "tokens": 57,                    # real tokens the model read for it (see below)
     "shared_experts": 1,             # always on: they process every one of the tokens
     "routed_experts": 127,           # R: length of every row of "counts"
     "counts": [[0, 3, ...], ...],    # per layer, routed assignments per expert (R ints)
     "subset": "legal.json",          # the subset the run was restricted to, or null
     "source_expert_ids": [[...], ...]}  # only for an extracted checkpoint: the ids its
                                          # experts had in the model it was cut from

Counts are in the numbering of the checkpoint given to the tool: a run restricted to a subset
(`--subset`, `--subset_from_prompt`) counts its experts under their ids in that checkpoint, so
the logs of full and restricted runs compare directly. Each count is the number of (token,
top-k slot) assignments of real tokens routed to that expert; a layer's counts add up to
about top_k x tokens (fewer where a weight was exactly 0, which is no assignment). Tokens read
for a generate request: its prompt and every generated token fed back before it ended (it
ends at its first eos, which is not read); for an eval document: all its tokens as packed
(eos included), padding excluded.
"""

from __future__ import annotations

import json
import time

import numpy as np

from emo_jax import storage


def expand(counts_LK, kept_LK, routed: int) -> np.ndarray:
    """Counts of an extracted model's experts per layer (K, or K_l padded to the largest), put
    at their original ids [L, R]."""
    counts_LK = np.asarray(counts_LK, np.int64)
    out_LR = np.zeros((counts_LK.shape[0], routed), np.int64)
    for layer, ids in enumerate(kept_LK):
        out_LR[layer, np.asarray(ids, np.int64)] = counts_LK[layer, :len(ids)]
    return out_LR


def source_ids(metadata: dict) -> list | None:
    """The original expert ids of an extracted checkpoint (from its metadata), else None."""
    subset = (metadata or {}).get("subset")
    return subset.get("layers") if isinstance(subset, dict) else None


class DocumentCounter:
    """Sums the routed assignments of documents over the batches of an evaluation."""

    def __init__(self, num_layers: int, routed: int):
        self.num_layers, self.routed = num_layers, routed
        self.counts = {}  # document index -> [L, R] int64
        self.tokens = {}  # document index -> real tokens

    def add(self, expert_idx_LBSK, document_ids_BS) -> None:
        """One batch: expert_idx_LBSK from the model's stats (-1 = no assignment), the packer's
        document_ids_BS (-1 at padding)."""
        idx_LBSK = np.asarray(expert_idx_LBSK)
        docs_BS = np.asarray(document_ids_BS)
        present = np.unique(docs_BS[docs_BS >= 0])
        if present.size == 0:
            return
        local_BS = np.searchsorted(present, np.maximum(docs_BS, 0))
        real_BS = docs_BS >= 0
        layers, routed = self.num_layers, self.routed
        valid_LBSK = (idx_LBSK >= 0) & real_BS[None, :, :, None]
        layer_LBSK = np.broadcast_to(np.arange(layers)[:, None, None, None], idx_LBSK.shape)
        doc_LBSK = np.broadcast_to(local_BS[None, :, :, None], idx_LBSK.shape)
        flat = ((doc_LBSK * layers + layer_LBSK) * routed + idx_LBSK)[valid_LBSK]
        sums = np.bincount(flat, minlength=present.size * layers * routed)
        sums = sums.reshape(present.size, layers, routed)
        tokens = np.bincount(local_BS[real_BS], minlength=present.size)
        for j, doc in enumerate(present.tolist()):
            if doc in self.counts:
                self.counts[doc] += sums[j]
                self.tokens[doc] += int(tokens[j])
            else:
                self.counts[doc] = sums[j].astype(np.int64)
                self.tokens[doc] = int(tokens[j])


class RequestLog:
    """Appends request records to a JSONL file (module docstring); one line per record."""

    def __init__(self, path: str, *, tool: str, checkpoint: str, shared_experts: int,
                 subset: str | None = None, metadata: dict | None = None):
        self.path = path
        storage.makedirs(storage.dirname(path))
        self.common = {"tool": tool, "checkpoint": storage.absolute(checkpoint),
                       "shared_experts": int(shared_experts), "subset": subset}
        ids = source_ids(metadata)
        if ids is not None:
            self.common["source_expert_ids"] = ids

    def write(self, counts_LR, tokens: int, **fields) -> dict:
        counts_LR = np.asarray(counts_LR, np.int64)
        record = {"tool": self.common["tool"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "checkpoint": self.common["checkpoint"], **fields, "tokens": int(tokens),
                  "shared_experts": self.common["shared_experts"],
                  "routed_experts": int(counts_LR.shape[1]), "counts": counts_LR.tolist(),
                  "subset": self.common["subset"]}
        if "source_expert_ids" in self.common:
            record["source_expert_ids"] = self.common["source_expert_ids"]
        line = json.dumps(record) + "\n"
        if storage.is_remote(self.path):  # no append on object storage: rewrite the object
            old = storage.read_text(self.path) if storage.exists(self.path) else ""
            storage.write_text(self.path, old + line)
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        return record


def read(path: str) -> list[dict]:
    """The records of a request log."""
    with storage.open_file(path) as f:
        return [json.loads(line) for line in f if line.strip()]
