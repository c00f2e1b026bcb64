"""From documents to packed rows: tokenize, count and drop bad records, split, pack, batch.

Stages, in pipeline order (each a Grain transform; only `DocumentFilterIterDataset` is ours):

  TokenizeDocument     doc -> {'tokens': int32[n] ending in eos} (bad-record markers pass);
                       with `data.boundary='eos_opens'`, starting with eos instead
                       (TokenizeIndexedDocument also tags tokens with the document index)
  DocumentFilter...    drops bad-record markers, counts them (or raises), counts documents and
                       tokens; the counts live in the iterator state (key `emo_data_stats`),
                       so they are checkpointed with it and survive Grain worker processes
  SplitDocument        a document longer than the row -> pieces of <= seq_len tokens, each
                       its own segment (skipped for concat_then_split, which splits itself)
  pack_rows            grain.experimental First/BestFit or ConcatThenSplit, renamed to the
                       batch format (docs/METHOD.md §7): int32 `tokens`, `segment_ids` (0 = padding,
                       1..n in row order), `positions` (restart at 0 in every segment)
  batch_rows           [B, S] batches; a short last batch (finite data) is padded with empty
                       rows (segment_ids 0), never dropped

With concat_then_split a document may continue in the next row: the continuation is a new
segment whose positions restart at 0 (what Grain emits, and what the tests check).
An optional per-token feature `document_ids` (index of the source document, -1 at padding)
is packed alongside for per-document evaluation; training batches never carry it.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from emo_jax.data.sources import BAD_REASONS, DataError, bad_record_error

STATS_KEY = "emo_data_stats"
LATEST_BAD_KEY = "emo_latest_bad_record"  # 'REASON at WHERE' of the newest bad record
PACKINGS = ("first_fit", "best_fit", "concat_then_split")
BOUNDARIES = ("eos_closes", "eos_opens")


class TokenizeDocument:
    """doc -> {'tokens': ids + [eos]} ('eos_closes'), or [eos] + ids ('eos_opens': eos opens
    the document, as in the reference's stream `... eos doc eos doc`); bad-record markers pass
    through. `boundary` is `data.boundary` (docs/METHOD.md section 7)."""

    def __init__(self, tokenizer, boundary: str = "eos_closes"):
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary {boundary!r} is not one of {BOUNDARIES}")
        self.tokenizer, self.boundary = tokenizer, boundary

    def __call__(self, doc: dict) -> dict:
        if "bad" in doc:
            return doc
        ids = self.tokenizer.encode_array(doc["text"])
        eos = np.int32(self.tokenizer.eos_id)
        tokens = np.append(ids, eos) if self.boundary == "eos_closes" else np.insert(ids, 0, eos)
        return {"tokens": tokens.astype(np.int32)}


class TokenizeIndexedDocument(TokenizeDocument):
    """(index, doc) -> tokens plus 'document_ids': index + 1 per token (0 stays padding)."""

    def __call__(self, index: int, doc: dict) -> dict:
        out = super().__call__(doc)
        if "bad" not in out:
            out["document_ids"] = np.full(out["tokens"].shape, index + 1, np.int32)
        return out


class SplitDocument(grain.experimental.FlatMapTransform):
    """Cuts every feature of an element into consecutive pieces of at most `seq_len`."""

    max_fan_out = 1 << 20  # unused by FlatMapIterDataset; documents of any length are split

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element):
        n = len(element["tokens"])
        return [{k: v[i:i + self.seq_len] for k, v in element.items()}
                for i in range(0, n, self.seq_len)]


@functools.lru_cache(maxsize=16)
def _eos_id(tokenizer_spec: str) -> int:
    from emo_jax.data.tokenizers import make_tokenizer  # noqa: PLC0415 (only for 'eos_opens')
    return int(make_tokenizer(tokenizer_spec).eos_id)


def opening_eos(config) -> int | None:
    """What the next-token targets need from `data.boundary` (`losses.next_token_targets`):
    None for 'eos_closes', the tokenizer's eos id for 'eos_opens' (so the tokenizer must be
    readable wherever the loss is traced, planning included; read once per spec)."""
    if config.data.boundary == "eos_closes":
        return None
    try:
        return _eos_id(config.data.tokenizer)
    except (OSError, ValueError) as err:
        from emo_jax.config import ConfigError  # noqa: PLC0415
        raise ConfigError(f"data.boundary='eos_opens' needs the eos id of data.tokenizer "
                          f"({config.data.tokenizer!r}), which cannot be read: {err}") from err


def _empty_counts() -> dict:
    return {"documents": 0, "tokens": 0, "split_documents": 0,
            **{f"bad_{reason}": 0 for reason in BAD_REASONS}}


class _DocumentFilterIterator(grain.DatasetIterator):

    def __init__(self, parent, *, on_bad_record, max_consecutive_bad, seq_len):
        super().__init__(parent)
        self._on_bad, self._max_bad, self._seq_len = on_bad_record, max_consecutive_bad, seq_len
        self._counts, self._consecutive_bad = _empty_counts(), 0
        self._latest_bad = None

    def __next__(self):
        while True:
            element = next(self._parent)
            if "bad" not in element:
                break
            if self._on_bad == "error":
                raise bad_record_error(element)
            self._counts[f"bad_{element['bad']}"] += 1
            self._latest_bad = f"{element['bad']} at {element['where']}"
            self._consecutive_bad += 1
            if self._consecutive_bad > self._max_bad:
                raise DataError(f"the last {self._consecutive_bad} records were all bad, more "
                                "than one pass over the data can hold if any were valid; latest "
                                f"at {element['where']} (counts: {self._counts})")
        self._consecutive_bad = 0
        n = len(element["tokens"])
        self._counts["documents"] += 1
        self._counts["tokens"] += n
        self._counts["split_documents"] += n > self._seq_len
        return element

    def get_state(self):
        return {"parent": self._parent.get_state(), STATS_KEY: dict(self._counts),
                "consecutive_bad": self._consecutive_bad, LATEST_BAD_KEY: self._latest_bad}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._counts = {**_empty_counts(), **state[STATS_KEY]}
        self._consecutive_bad = state["consecutive_bad"]
        self._latest_bad = state.get(LATEST_BAD_KEY)


class DocumentFilterIterDataset(grain.IterDataset):
    """Drops and counts bad-record markers; raises on the first with on_bad_record='error'.

    `max_consecutive_bad` bounds a run of bad records: past it the data cannot hold a valid
    document for this reader, and reading on would be an endless loop over a repeated source.
    (A source with no valid document at all is refused before iteration starts.)
    """

    def __init__(self, parent, *, on_bad_record: str, max_consecutive_bad: int, seq_len: int):
        super().__init__(parent)
        self._kwargs = dict(on_bad_record=on_bad_record, max_consecutive_bad=max_consecutive_bad,
                            seq_len=seq_len)

    def __iter__(self):
        self.latest = _DocumentFilterIterator(self._parent.__iter__(), **self._kwargs)
        return self.latest

    def __getstate__(self):  # sent to Grain workers without the iterator of this process
        state = dict(self.__dict__)
        state.pop("latest", None)
        return state

    def live_counts(self) -> tuple[dict, str | None]:
        """(counts, latest bad record) of the newest iterator's reads so far, in the same process
        (a one-pass reader's; `data_stats` gives a checkpointable position's)."""
        it = getattr(self, "latest", None)
        if it is None:
            return _empty_counts(), None
        counts = dict(it._counts)
        counts["bad_records"] = sum(counts[f"bad_{reason}"] for reason in BAD_REASONS)
        return counts, it._latest_bad

    def __str__(self):
        return "DocumentFilterIterDataset"


def _to_batch_format(row: dict) -> dict:
    out = {"tokens": row["tokens"].astype(np.int32),
           "segment_ids": row["tokens_segment_ids"].astype(np.int32),
           "positions": row["tokens_positions"].astype(np.int32)}
    if "document_ids" in row:  # still shifted by one: 0 is padding until `unshift_document_ids`
        out["document_ids"] = row["document_ids"].astype(np.int32)
    return out


def unshift_document_ids(batch: dict) -> dict:
    """Document ids were stored +1 so that Grain's zero padding reads 0; make padding -1."""
    return {**batch, "document_ids": batch["document_ids"] - 1}


def pack_rows(ds: grain.IterDataset, *, packing: str, seq_len: int, packing_bins: int,
              seed: int, shuffle_bins: bool, features=("tokens",)) -> grain.IterDataset:
    """Packs tokenized documents (pre-split for the fit packers) into rows in batch format."""
    length_struct = {name: seq_len for name in features}
    if packing == "concat_then_split":
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=length_struct)
    elif packing in ("first_fit", "best_fit"):
        ds = grain.experimental.FlatMapIterDataset(ds, SplitDocument(seq_len))
        packer = (grain.experimental.FirstFitPackIterDataset if packing == "first_fit"
                  else grain.experimental.BestFitPackIterDataset)
        ds = packer(ds, length_struct=length_struct, num_packing_bins=packing_bins,
                    seed=seed, shuffle_bins=shuffle_bins)
    else:
        raise ValueError(f"packing {packing!r} is not one of {PACKINGS}")
    return ds.map(_to_batch_format)


def batch_rows(ds: grain.IterDataset, batch_size: int) -> grain.IterDataset:
    """[B, S] batches; the last one padded with empty rows when the data ends."""
    return ds.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                                           batch_size=batch_size))


def fill_ratio(batches) -> float:
    """Fraction of token slots holding a document token (segment id > 0) over `batches`."""
    filled = total = 0
    for batch in batches:
        filled += int(np.count_nonzero(batch["segment_ids"]))
        total += batch["segment_ids"].size
    return filled / max(total, 1)


def data_stats(iterator) -> dict:
    """Documents, tokens, split documents and bad records (per reason) read so far.

    Summed over the document filters found in the iterator's state (one per Grain worker), so
    the counts are those of the position a checkpoint restores: they may trail the newest
    batch by the documents of one packing window, and they resume with the iterator.
    """
    totals = _empty_counts()
    for value in _values_under(iterator.get_state(), STATS_KEY):
        for name, count in value.items():
            totals[name] = totals.get(name, 0) + int(count)
    totals["bad_records"] = sum(totals[f"bad_{reason}"] for reason in BAD_REASONS)
    return totals


def _values_under(node, key):
    """Every value stored under `key` in a nested dict/list state (one per Grain worker)."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            else:
                yield from _values_under(value, key)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _values_under(value, key)


def latest_bad_record(iterator) -> str | None:
    """'REASON at WHERE' of a bad record skipped most recently (by some Grain worker), or None."""
    found = list(_values_under(iterator.get_state(), LATEST_BAD_KEY))
    return next((f for f in reversed(found) if f), None)
