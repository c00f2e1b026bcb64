"""Benchmark: packed tokens per second of the Grain pipeline on the bundled corpus.

    python bench/bench_pipeline.py [--batches=200] [--seq_lens=256,1024] [--sp_model=PATH]

For each tokenizer (byte; SentencePiece, trained here on the bundled corpus unless --sp_model
is given), packing mode and row length, it times `--batches` host batches of the training
iterator (after a warm-up) and reports token slots per second, document tokens (non-padding)
per second and the fill ratio. Extra rows per tokenizer: no read threads, and Grain worker
processes. On a shared 2-core machine expect +-30% between runs.
Prints a table and writes bench/out/bench_pipeline.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import app, flags

from emo_jax.config import default_config
from emo_jax.data import fill_ratio, make_tokenizer, make_train_iterator
from emo_jax.data.train_tokenizer import train as train_sentencepiece

_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches per configuration.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Rows per batch.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "1024"], "Row lengths to time.")
_SP_MODEL = flags.DEFINE_string("sp_model", "", "SentencePiece model ('' = train one, 8k).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes of the extra rows (0 = none).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "out",
                                               "bench_pipeline.json"), "JSON output path.")


def time_pipeline(tokenizer: str, packing: str, seq_len: int, workers: int = 0,
                  read_threads: int = 2) -> dict:
    c = default_config()
    c.data.update(tokenizer=tokenizer, packing=packing, seq_len=seq_len,
                  batch_size=_BATCH_SIZE.value, worker_count=workers, read_threads=read_threads)
    c.model.vocab_size = max(c.model.vocab_size, make_tokenizer(tokenizer).vocab_size)
    it = make_train_iterator(c, process_index=0, process_count=1)
    for _ in range(5 if workers == 0 else 20):  # warm-up (workers start, buffers fill)
        next(it)
    start = time.perf_counter()
    batches = [next(it) for _ in range(_BATCHES.value)]
    seconds = time.perf_counter() - start
    it.close()
    slots = sum(b["tokens"].size for b in batches)
    fill = fill_ratio(batches)
    return {"tokenizer": tokenizer.split(":")[0], "packing": packing, "seq_len": seq_len,
            "workers": workers, "read_threads": read_threads, "batch_size": _BATCH_SIZE.value,
            "seconds": round(seconds, 3),
            "slots_per_s": round(slots / seconds), "tokens_per_s": round(fill * slots / seconds),
            "fill_ratio": round(fill, 4)}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = _SP_MODEL.value or train_sentencepiece("", os.path.join(tmp, "sp8k"), 8000,
                                                          max_chars=3_000_000)
        rows = []
        for tokenizer in ("byte", f"sentencepiece:{sp_model}"):
            for seq_len in map(int, _SEQ_LENS.value):
                for packing in ("first_fit", "best_fit", "concat_then_split"):
                    rows.append(time_pipeline(tokenizer, packing, seq_len))
                    print(rows[-1], flush=True)
            seq_len = int(_SEQ_LENS.value[0])
            rows.append(time_pipeline(tokenizer, "first_fit", seq_len, read_threads=0))
            if _WORKERS.value:
                rows.append(time_pipeline(tokenizer, "first_fit", seq_len, _WORKERS.value))
    header = ("tokenizer", "packing", "seq_len", "read_threads", "workers", "slots_per_s",
              "tokens_per_s", "fill_ratio")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:,}" if isinstance(row[k], int) and k.endswith("_s")
                                else str(row[k]) for k in header) + " |")
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"machine": f"{platform.node()} ({os.cpu_count()} cpus)",
                   "load_average_1min_at_end": os.getloadavg()[0],
                   "command": "python bench/bench_pipeline.py", "rows": rows}, f, indent=1)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; "
          f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
