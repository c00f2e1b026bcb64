"""Training metrics out of the loop: console progress, TensorBoard, metrics.jsonl, FLOPs and MFU.

Only process 0 writes; the other processes get a writer that does nothing. The loop hands over
step n's metrics (already on the host) after it has dispatched step n+1, so the device never
waits for logging.

What is written, per logged step (`train.log_every`; every step's record goes to metrics.jsonl
when log_every is 1):
  loss, cross_entropy, balance_loss, router_z_loss, output_z_loss, learning_rate, grad_norm,
  mean_pool_size, dropped_tokens, skipped_steps, step_ok, skipped_records (bad data records
  skipped so far by process 0's data shards: the whole stream on one host);
  per layer (lists in JSONL, `name/layer_i` in TensorBoard): max_load_ratio (max/mean expert
  load), unused_experts (experts with no assignment in the step);
  throughput: tokens_per_s (all B x S positions, padding included: the compute spent),
  tflops_per_device (= flops_per_token x tokens/s / devices, flops_per_token from
  emo_jax/model/summary.py) and mfu (against the device's peak, table below), step_time_s.
Evaluation records carry `eval_loss` and `eval_perplexity`. A local metrics.jsonl is flushed
at every record; one on object storage (gs://), which cannot append, is uploaded whole at most
every OBJECT_UPLOAD_EVERY_S seconds and at every event record.

Console: an updating one-line progress bar (step, loss, tokens/s, ETA) when stdout is a TTY,
otherwise one plain line per logged step.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np

from emo_jax import storage

OBJECT_UPLOAD_EVERY_S = 30.0

# Peak dense bfloat16 matmul TFLOP/s of one device (one chip, or one GPU), by a substring of
# jax's `device_kind`, most specific first. Sources: the vendors' spec sheets (dense, no
# sparsity). Kinds not listed (CPUs) get no MFU unless train.peak_tflops is set.
PEAK_TFLOPS = (
    ("TPU v6", 918.0),  # Trillium (v6e)
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; PCIe cards are 756
    ("A100", 312.0),
    ("L4", 121.0),
)


def peak_tflops(config, device_kind: str | None = None) -> float | None:
    """Peak TFLOP/s of one device: train.peak_tflops if set, else the table, else None."""
    if config.train.peak_tflops > 0:
        return float(config.train.peak_tflops)
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    for name, value in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return value
    return None


def flatten(metrics: dict) -> dict:
    """Host metrics -> JSON-ready dict: scalars as floats, per-layer `_L` arrays as lists."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name in ("counts_LR", "tokens_L"):
            continue
        if name.endswith("_L"):
            out[name[:-2]] = [float(v) for v in value.reshape(-1)]
        elif value.size == 1:
            out[name] = float(value.reshape(()))
        else:
            out[name] = value.tolist()
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU from the wall time between metric reads."""

    def __init__(self, config, summary: dict, num_devices: int):
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.flops_per_token = summary["flops_per_token"]
        self.num_devices = num_devices
        self.peak = peak_tflops(config)
        self.last = None  # (step, time) of the previous read
        self.step_time = None

    def update(self, step: int) -> dict:
        now = time.perf_counter()
        out = {}
        if self.last is not None and step > self.last[0]:
            self.step_time = (now - self.last[1]) / (step - self.last[0])
            tokens_per_s = self.tokens_per_step / self.step_time
            tflops = self.flops_per_token * tokens_per_s / self.num_devices / 1e12
            out = {"step_time_s": self.step_time, "tokens_per_s": tokens_per_s,
                   "tflops_per_device": tflops}
            if self.peak:
                out["mfu"] = tflops / self.peak
        self.last = (step, now)
        return out


class _ObjectLog:
    """metrics.jsonl on object storage, which cannot append: the whole file is kept in memory
    (what an earlier run wrote, then this run's lines) and uploaded again: at most every
    `upload_every_s` for step records, and at once for events (start, resume, preemption,
    done), checkpoints and close. A killed run loses only records of steps after its newest
    checkpoint, which the resumed run logs again; the upload, which grows with the file, costs
    the loop at most once per interval."""

    def __init__(self, path: str, upload_every_s: float):
        self.path = path
        self.upload_every_s = upload_every_s
        self.text = storage.read_text(path) if storage.exists(path) else ""
        if self.text and not self.text.endswith("\n"):
            self.text += "\n"
        self.pending = False
        self.uploaded_at = -math.inf

    def write(self, text: str):
        self.text += text
        self.pending = True

    def flush(self):
        if time.monotonic() - self.uploaded_at >= self.upload_every_s:
            self.upload()

    def upload(self):
        if self.pending:
            storage.write_text(self.path, self.text)
            self.pending = False
            self.uploaded_at = time.monotonic()

    def close(self):
        self.upload()


class MetricWriter:
    """metrics.jsonl + TensorBoard + console, on process 0 only."""

    def __init__(self, workdir: str, config, *, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        self.total = total_steps
        self.start = start_step
        self.log_every = config.train.log_every
        self.tty = sys.stdout.isatty()
        self.started = time.perf_counter()
        self.jsonl = None
        self.tb = None
        if not self.active:
            return
        storage.makedirs(workdir)
        path = storage.join(workdir, "metrics.jsonl")
        if storage.is_remote(path):
            self.jsonl = _ObjectLog(path, OBJECT_UPLOAD_EVERY_S)
        else:
            self.jsonl = open(path, "a", encoding="utf-8")
        try:  # deferred: optional at run time (see below), and only process 0 writes
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(storage.join(workdir, "tensorboard"))
        except ImportError:  # tensorboardX is a dependency; a stripped install still trains
            self.tb = None
        except Exception as err:  # noqa: BLE001 (gs:// needs google-cloud-storage, credentials)
            print(f"warning: no TensorBoard events in {workdir}: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            self.tb = None

    def event(self, step: int, **fields):
        """A non-metric record (start, resume, preemption, stop) in metrics.jsonl."""
        if self.active:
            self._write(dict(fields, step=step, time=time.time()))
            self.sync()

    def sync(self):
        """Makes every record written so far durable: a local metrics.jsonl is flushed at each
        record already; one on object storage is uploaded now (the loop calls this with every
        checkpoint, so the records of the steps a resume will not repeat are never lost)."""
        if isinstance(self.jsonl, _ObjectLog):
            self.jsonl.upload()

    def _write(self, record: dict):
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()

    def write(self, step: int, metrics: dict, *, console: bool = True):
        """One record of step `step`: `metrics` is a flat JSON-ready dict (see `flatten`)."""
        if not self.active:
            return
        self._write(dict(metrics, step=step, time=time.time()))
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{name}/layer_{i}", v, step)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if console:
            self._console(step, metrics)

    def _console(self, step: int, metrics: dict):
        done = step - self.start
        if "step_time_s" in metrics:  # excludes compilation, unlike the elapsed time
            eta = metrics["step_time_s"] * (self.total - step)
        else:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        if "eval_loss" in metrics:
            line = (f"step {step}/{self.total}  eval_loss {metrics['eval_loss']:.4f}  "
                    f"eval_perplexity {metrics['eval_perplexity']:.2f}")
            print(("\n" if self.tty else "") + line, flush=True)
            return
        parts = [f"step {step}/{self.total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        if "mfu" in metrics:
            parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {int(metrics['skipped_steps'])}")
        if metrics.get("skipped_records"):
            parts.append(f"bad records {int(metrics['skipped_records'])}")
        parts.append(f"eta {_fmt_time(eta)}")
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "[" + "#" * filled + "." * (width - filled) + "]"
            end = "\n" if step >= self.total else ""
            print(f"\r{bar} " + "  ".join(parts) + "\033[K", end=end, flush=True)
        else:
            print("  ".join(parts), flush=True)

    def message(self, text: str):
        """A line for the user on the console (process 0)."""
        if self.active:
            print(("\n" if self.tty else "") + text, flush=True)

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
