"""This process's rows of every global training batch, resumable across process counts.

The data stream of a run is D *logical shards*: shard s is the Grain iterator
`make_train_iterator(config, process_index=s, process_count=D)`, and rows
[s * B/D, (s+1) * B/D) of every global batch of B rows come from it. D is the number of
processes of the run's first launch and is kept in every checkpoint, so a run resumed with a
different number of processes (a pod resumed on one host, or the reverse) reads exactly the
same global batches: each process runs the shards that overlap its rows of the batch
([p * B/P, (p+1) * B/P) for process p of P) and keeps its rows. With P = D, the usual case,
each process runs one shard, its own.

The checkpointed state is JSON: {"num_shards": D, "shards": [state of shard 0, ...]},
gathered from all processes (each shard's state comes from the first process that runs it).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from emo_jax import parallel
from emo_jax.config import ConfigError
from emo_jax.data import packing
from emo_jax.data.pipeline import make_train_iterator


def _allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    lengths = lengths.reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(gathered[i, :lengths[i]]).decode("utf-8"))
            for i in range(len(lengths))]


class DataFeed:
    """Host batches of this process, read from the logical data shards it overlaps."""

    def __init__(self, config, *, num_shards: int | None = None, rows: tuple[int, int] | None = None):
        """num_shards: D (default: the process count); rows: [lo, hi) of the global batch this
        process feeds (default: its contiguous block, `parallel.host_rows`)."""
        self.num_shards = num_shards or jax.process_count()
        b = config.data.batch_size
        if b % self.num_shards:
            raise ConfigError(f"data.batch_size ({b}) must be divisible by the {self.num_shards} "
                              f"data shards (the processes of the run's first launch)")
        if rows is None:
            block = parallel.host_rows(b)
            rows = (block.start, block.stop)
        lo, hi = rows
        per_shard = b // self.num_shards
        self.shards = list(range(lo // per_shard, (hi - 1) // per_shard + 1))
        self.rows = slice(lo - self.shards[0] * per_shard, hi - self.shards[0] * per_shard)
        self.iterators = {s: make_train_iterator(config, process_index=s,
                                                 process_count=self.num_shards)
                          for s in self.shards}

    def next(self) -> dict:
        """The next host batch: int32 arrays [batch_size / process_count, seq_len]."""
        parts = [next(self.iterators[s]) for s in self.shards]
        if len(parts) == 1 and self.rows == slice(0, len(parts[0]["tokens"])):
            return {k: np.asarray(v) for k, v in parts[0].items()}
        return {k: np.concatenate([np.asarray(p[k]) for p in parts])[self.rows]
                for k in parts[0]}

    def get_state(self) -> dict:
        """The state of every shard (a collective: every process must call it)."""
        mine = {str(s): it.get_state() for s, it in self.iterators.items()}
        merged = {}
        for states in _allgather_json(mine):
            for s, state in states.items():
                merged.setdefault(s, state)
        missing = [s for s in range(self.num_shards) if str(s) not in merged]
        if missing:
            raise RuntimeError(f"data shards {missing} are read by no process")
        return {"num_shards": self.num_shards,
                "shards": [merged[str(s)] for s in range(self.num_shards)]}

    def data_stats(self) -> tuple[dict, str | None]:
        """(document, token and bad-record counts, 'REASON at WHERE' of a recent bad record)
        of this process's shards so far (`emo_jax.data.packing.data_stats`; no collective)."""
        totals, latest = {}, None
        for it in self.iterators.values():
            for name, count in packing.data_stats(it).items():
                totals[name] = totals.get(name, 0) + count
            latest = packing.latest_bad_record(it) or latest
        return totals, latest

    def set_state(self, state: dict):
        if state["num_shards"] != self.num_shards:
            raise ValueError(f"data state has {state['num_shards']} shards, feed has "
                             f"{self.num_shards}")
        for s, it in self.iterators.items():
            it.set_state(state["shards"][s])

    def close(self):
        for it in self.iterators.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()
