"""The Grain input pipeline: per-host, resumable training batches and deterministic eval batches.

Training (`make_train_iterator`), per host:

  sources (spec) -> each: host slice [process_index::process_count] -> seeded shuffle
     -> mix by weight (several sources) -> repeat (data.num_epochs; 0 = forever)
     -> tokenize + eos (data.read_threads) -> drop/count bad records -> split long documents
     -> pack rows (first_fit | best_fit | concat_then_split) -> batch [B_host, S]
     -> Grain worker processes (data.worker_count) -> prefetch thread (data.prefetch)

The host slice is taken before shuffling, so hosts read disjoint documents whose union is the
whole source; every epoch is reshuffled (the seed is folded with the epoch number by Grain).
With several sources, one epoch ends when the source with the smallest size/weight has been
read once; the others continue where they were in the next epoch. The returned Grain
`DatasetIterator` has `get_state()`/`set_state()` (JSON; restored state gives the identical
next batches when the config, the process count and `data.worker_count` are the same), which
`grain.checkpoint.CheckpointSave(it)` writes into Orbax checkpoints. `data_stats(it)` gives the
document, token and bad-record counts read so far. With `data.num_epochs > 0` hosts may get
different numbers of batches (their slices differ by up to one document per source), so
multi-host training should repeat forever (0) and stop at train.steps.

With `data.worker_count > 0`, Grain starts worker processes: the main program must have an
`if __name__ == "__main__":` guard (absl flags are parsed here if the program has not).

Evaluation (`make_eval_batches`) is one pass in source order with no shuffle; every host packs
the whole eval set and keeps its rows of each global batch, so all hosts get the same number of
batches. `pack_documents` packs an in-memory list of documents and tags every token with the
index of its document, for per-domain evaluation.
"""

from __future__ import annotations

import itertools
import sys
from typing import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging

from emo_jax import parallel
from emo_jax.config import ConfigError
from emo_jax.data import packing
from emo_jax.data.sources import DataError, bad_record_error, open_source, parse_spec
from emo_jax.data.tokenizers import check_vocab, make_tokenizer

data_stats = packing.data_stats
fill_ratio = packing.fill_ratio


def _processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _read_options(threads: int) -> grain.ReadOptions:
    # Read threads overlap file and network latency (e.g. ArrayRecord on remote storage). On
    # the 2-core development machine 0, 2 and 4 threads measured the same within noise
    # (bench/bench_pipeline.py), for the byte tokenizer and SentencePiece alike.
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64 if threads else 0)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _require_document(ds: grain.MapDataset, entry: str, on_bad_record: str, where: str):
    """Reads until the first valid document; a (host slice of a) source with none is an error."""
    reasons, first = {}, ""
    for i in range(len(ds)):
        doc = ds[i]
        if "bad" not in doc:
            return
        if on_bad_record == "error":
            raise bad_record_error(doc)
        reasons[doc["bad"]] = reasons.get(doc["bad"], 0) + 1
        first = first or f"; first: {doc['bad']} at {doc['where']}"
    raise DataError(f"data source '{entry}' has no valid document{where} "
                    f"({len(ds)} records; bad: {reasons or 'none'}{first})")


def _open_sources(spec: str, *, default: str, key: str, d: ml_collections.ConfigDict,
                  host: tuple[int, int]):
    """[(entry, host MapDataset of documents)] of a spec; sources without a document refused."""
    pi, pc = host
    out = []
    for entry in parse_spec(spec, default=default, key=key):
        source = open_source(entry.target, text_field=d.text_field, tfds_data_dir=d.tfds_data_dir)
        ds = grain.MapDataset.source(source)[pi::pc]
        where = f" for host {pi} of {pc}" if pc > 1 else ""
        _require_document(ds, entry.target, d.on_bad_record, where)
        out.append((entry, ds))
    return out


def _max_consecutive_bad(datasets, weights, workers: int) -> int:
    """More bad records in a row than one pass of the mixed stream can hold between two valid
    ones (each source has one per pass); workers see 1/workers of it, hence the factor."""
    shares = np.asarray(weights, np.float64) / np.sum(weights)
    longest_pass = max(len(ds) / share for ds, share in zip(datasets, shares))
    return int(2 * longest_pass * max(1, workers)) + 16


def _ensure_flags_parsed():
    """Grain worker processes read absl flags; parse defaults when the program has not."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Endless (or data.num_epochs) host batches: int32 tokens/segment_ids/positions [B_host, S].

    B_host = data.batch_size // process_count. Defaults: jax.process_index()/process_count().
    Raises ConfigError when model.vocab_size does not cover the tokenizer.
    """
    d = config.data
    pi, pc = _processes(process_index, process_count)
    if d.batch_size % pc:
        raise ConfigError(f"data.batch_size ({d.batch_size}) must be divisible by the number of "
                          f"processes ({pc})")
    tokenizer = make_tokenizer(d.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    opened = _open_sources(d.train_sources, default="bundled:train", key="data.train_sources",
                           d=d, host=(pi, pc))
    datasets = [ds.shuffle(seed=_seed(d.seed, k)) if d.shuffle else ds
                for k, (_, ds) in enumerate(opened)]
    weights = [entry.weight for entry, _ in opened]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = ds.repeat(d.num_epochs or None).map(packing.TokenizeDocument(tokenizer, d.boundary))
    it_ds = ds.to_iter_dataset(_read_options(d.read_threads))
    it_ds = packing.DocumentFilterIterDataset(
        it_ds, on_bad_record=d.on_bad_record, seq_len=d.seq_len,
        max_consecutive_bad=_max_consecutive_bad(datasets, weights, d.worker_count))
    it_ds = packing.pack_rows(it_ds, packing=d.packing, seq_len=d.seq_len,
                              packing_bins=d.packing_bins, seed=_seed(d.seed, pi, 7),
                              shuffle_bins=d.shuffle)
    it_ds = packing.batch_rows(it_ds, d.batch_size // pc)
    if d.worker_count > 0:
        _ensure_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    if d.prefetch > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds,
                                                             prefetch_buffer_size=d.prefetch)
    return iter(it_ds)


def _packed_batches(docs: grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int,
                    packing_mode: str, packing_bins: int, on_bad_record: str,
                    with_document_ids: bool, read_threads: int = 2,
                    boundary: str = "eos_closes"):
    """(iterator, document filter): one deterministic pass over `docs` (a MapDataset of
    documents) as padded batches; the filter's `live_counts()` are that pass's reads."""
    if with_document_ids:
        ds = docs.map_with_index(packing.TokenizeIndexedDocument(tokenizer, boundary))
    else:
        ds = docs.map(packing.TokenizeDocument(tokenizer, boundary))
    it_ds = ds.to_iter_dataset(_read_options(read_threads))
    document_filter = it_ds = packing.DocumentFilterIterDataset(
        it_ds, on_bad_record=on_bad_record, seq_len=seq_len, max_consecutive_bad=len(docs) + 1)
    features = ("tokens", "document_ids") if with_document_ids else ("tokens",)
    it_ds = packing.pack_rows(it_ds, packing=packing_mode, seq_len=seq_len,
                              packing_bins=packing_bins, seed=0, shuffle_bins=False,
                              features=features)
    it_ds = packing.batch_rows(it_ds, batch_size)
    it = iter(it_ds.map(packing.unshift_document_ids) if with_document_ids else it_ds)
    return it, document_filter


def make_eval_batches(config: ml_collections.ConfigDict, *, max_batches: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> list[dict]:
    """Host batches of one unshuffled pass over data.eval_sources (at most max_batches).

    Each is a dict of int32 [data.batch_size // process_count, data.seq_len] arrays `tokens`,
    `segment_ids`, `positions`; the last one may hold empty rows (segment_ids 0). Every host
    packs the same global batches and keeps its own rows, so all hosts get as many batches.
    """
    d = config.data
    pi, pc = _processes(process_index, process_count)
    if d.batch_size % pc:
        raise ConfigError(f"data.batch_size ({d.batch_size}) must be divisible by the number of "
                          f"processes ({pc})")
    opened = _open_sources(d.eval_sources, default="bundled:eval", key="data.eval_sources", d=d,
                           host=(0, 1))
    docs = grain.MapDataset.concatenate([ds for _, ds in opened])
    tokenizer = make_tokenizer(d.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    it, document_filter = _packed_batches(
        docs, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size, packing_mode=d.packing,
        packing_bins=d.packing_bins, on_bad_record=d.on_bad_record, with_document_ids=False,
        read_threads=d.read_threads, boundary=d.boundary)
    rows = parallel.host_rows(d.batch_size, pi, pc)
    batches = [{k: v[rows] for k, v in batch.items()}
               for batch in itertools.islice(it, max_batches)]
    # The filter's own counts: the iterator state trails the last packed batch, and a bad
    # record after the last document (a truncated .gz ends so) would never show there.
    stats, latest = document_filter.live_counts()
    if stats["bad_records"] and pi == 0:
        logging.warning("data.eval_sources: skipped %d bad records (%s); latest: %s",
                        stats["bad_records"], {k[4:]: v for k, v in stats.items()
                                               if k.startswith("bad_") and v and
                                               k != "bad_records"}, latest)
    return batches


def pack_documents(docs: Sequence[str | dict], tokenizer, seq_len: int, batch_size: int, *,
                   packing: str = "first_fit", packing_bins: int = 16,
                   boundary: str = "eos_closes") -> Iterator[dict]:
    """Packs `docs` (strings or `{'text': ...}` dicts, e.g. from `read_documents`) in one pass.

    Yields dicts of int32 [batch_size, seq_len] arrays: `tokens`, `segment_ids`, `positions`
    (the batch format) plus `document_ids`: for every token the index in `docs` of its
    document, -1 at padding. A long document is split into several segments with the same
    index. Deterministic; the last batch is padded with empty rows. `boundary`: where each
    document's eos goes (`data.boundary`).
    """
    items = [{"text": doc} if isinstance(doc, str) else doc for doc in docs]
    if not items:
        return iter(())
    return _packed_batches(grain.MapDataset.source(items), tokenizer, seq_len=seq_len,
                           batch_size=batch_size, packing_mode=packing,
                           packing_bins=packing_bins, on_bad_record="error",
                           with_document_ids=True, boundary=boundary)[0]
