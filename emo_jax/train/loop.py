"""`train_and_evaluate(config, workdir)`: the training loop, with resume, evaluation, logging,
checkpoints and preemption.

One call trains from wherever the workdir stands to `train.steps`:
  1. mesh from the config; the TrainState restored from the newest readable checkpoint of the
     workdir (data iterators included), else created fresh (optionally with the parameters of
     `init_checkpoint`);
  2. per step: next host batch -> global batch -> dispatch the jitted step -> then read the
     *previous* step's metrics (so the host never stalls the device) -> log, evaluate every
     `train.eval_every` steps, checkpoint every `checkpoint.every` steps;
  3. at the end: evaluate, save the final checkpoint, wait for it.
SIGTERM/SIGINT (preemption) set a flag; at the next step boundary every process agrees to
stop, a checkpoint of the current step is saved and waited for, and the call returns with
`preempted` set (the CLI exits 128 + signal number). Rerunning the same command resumes.
Before the loop starts (data, state, restore; one process) a signal raises StoppedBeforeStart
at once: nothing is saved. A run that fails or is stopped before its first step removes the
workdir if it created it (nothing in it but what that run wrote, and never a checkpoint).

A step whose loss or gradient is not finite is skipped by the step itself; here it is
reported, and `train.max_bad_steps` of them in a row stop the run with `TrainingError` without
saving (the last checkpoint, taken before, stays the newest).

A save that fails (disk full, permissions, quota: Orbax raises, at once or in its background
thread) stops the run with `checkpoint.SaveError` naming the checkpoint's path and the cause:
at the save itself, or for an asynchronous one at the next logged step (the loop polls the
save's status), at the latest at the end of the run. Nothing is lost but the steps since the
newest complete checkpoint, which stays intact (Orbax finalises a checkpoint only when all of
it is written).

This module never builds the model or the optimiser itself (step.py) and never formats files
(checkpoint.py, metrics.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import zlib

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from emo_jax import model_files, parallel, storage
from emo_jax.config import ConfigError, validate
from emo_jax.data.pipeline import make_eval_batches
from emo_jax.data.tokenizers import check_vocab, make_tokenizer
from emo_jax.model.summary import summarize
from emo_jax.model.model_config import ModelConfig
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import metrics as metrics_lib
from emo_jax.train import modules
from emo_jax.train import step as step_lib
from emo_jax.train.feed import DataFeed


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); one clear sentence."""


class StoppedBeforeStart(BaseException):
    """SIGTERM/SIGINT arrived before the first step (one process): nothing was saved. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` eats it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.removed_workdir = None  # the workdir this run had created and then removed

    def message(self) -> str:
        removed = (f"; removed the workdir {self.removed_workdir} that it had created"
                   if self.removed_workdir else "")
        return (f"{signal.Signals(self.signum).name} received before the first training step: "
                f"stopped; nothing was saved{removed}")


class _SignalFlag:
    """SIGTERM/SIGINT as a request to checkpoint and stop at a step every process agrees on.

    One process: a Python handler records the signal; the loop stops after the current step.
    Several processes: SIGTERM is left to JAX's preemption service (installed by
    jax.distributed.initialize), which tells every process the same safe step
    (`reached_preemption_sync_point`) even when one host alone got the signal; SIGINT is turned
    into SIGTERM. No device collective is involved, so the check never stalls the device.
    A second signal of the same kind acts at once (the default behaviour).
    """

    def __init__(self, enabled: bool):
        self.signum = None
        self.started = False  # set when the loop starts stepping; before, a signal stops at once
        self.before_start = None  # a signal that arrived before the loop started
        self.exit_before_start = None  # set by train_and_evaluate: cleans up, says so, exits
        self.previous = {}
        self.multi = jax.process_count() > 1
        if not enabled:
            return
        signals = (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        if not self.started and not self.multi:  # startup: nothing to save, stop now
            # Not by raising: Python drops an exception raised while the handler runs inside
            # a callback (e.g. a garbage-collection hook), and startup would go on.
            self.before_start = signum
            if self.exit_before_start is not None:
                self.exit_before_start(StoppedBeforeStart(signum))
            raise StoppedBeforeStart(signum)
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM
                          else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service

    def start(self):
        """The loop starts stepping: from here a signal checkpoints at the next step boundary."""
        if self.before_start is not None:
            raise StoppedBeforeStart(self.before_start)
        self.started = True

    def stop_at(self, step_number: int) -> int | None:
        """The signal number if the run must checkpoint and stop after this step."""
        if not self.multi:
            return self.signum
        if multihost_utils.reached_preemption_sync_point(step_number):
            return self.signum or signal.SIGTERM
        return None

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _evaluate(eval_step, params, batches, mesh) -> dict:
    ce, predicted = 0.0, 0.0
    for batch in batches:
        sums = jax.device_get(eval_step(params, parallel.host_to_global(batch, mesh)))
        ce += float(np.sum(sums["ce_sum"]))
        predicted += float(np.sum(sums["predicted"]))
    loss = ce / max(predicted, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 80.0))),
            "eval_tokens": predicted}


def _write_config(workdir: str, config):
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.json"), config.to_json(indent=2))


def _init_params_from(path: str, state, config):
    """Replaces the model parameters of a fresh state by those of a checkpoint or model dir."""
    target = nnx.to_pure_dict(state["model"])
    pure, _, meta = model_files.load_params(path, target, config)
    nnx.replace_by_pure_dict(state["model"], pure)
    return meta


def _config_changes(saved: dict, config) -> list[str]:
    now = json.loads(config.to_json())
    changes = []
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and not isinstance(value, dict):
                changes.append(f"{section}.{key} {old!r} -> {value!r}")
    return changes


def _process_rows(config, mesh) -> tuple[int, int]:
    rows = parallel.process_rows(mesh, config.data.batch_size)
    if rows.size == 0 or not np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        raise TrainingError("this process's batch rows are not one contiguous block of the "
                            "global batch; build the mesh from jax.devices() in their order")
    return int(rows[0]), int(rows[0] + rows.size)


class _Run:
    """One call of train_and_evaluate: the state, the data, the writers, and the loop."""

    def __init__(self, config, workdir: str, init_checkpoint: str | None, stack, flag,
                 trainable=None, train_router: str | None = None):
        self.config = config
        check_vocab(make_tokenizer(config.data.tokenizer), config.model.vocab_size)
        self.mesh = mesh = parallel.make_mesh(config)
        parallel.check_batch(config, mesh)
        parallel.check_experts(config, mesh)
        rows = _process_rows(config, mesh)
        self.workdir = storage.absolute(workdir)
        if jax.process_index() == 0:
            try:
                storage.makedirs(self.workdir)
            except OSError as err:
                raise ConfigError(f"workdir '{workdir}' cannot be created: "
                                  f"{err.strerror or err}") from None
        self.summary = summarize(ModelConfig.from_config(config), config.data.seq_len)
        self.checkpointer = ckpt_lib.Checkpointer(self.workdir, config)
        stack.callback(self.checkpointer.close)
        self.trainable = modules.for_run(self.workdir, trainable, train_router, config,
                                         ckpt_lib.has_checkpoints(self.workdir))
        graphdef, abstract, self.shardings = step_lib.abstract_state(config, mesh,
                                                                     self.trainable)

        restored = self.checkpointer.restore_latest(abstract)
        self.resumed_from = None
        changes = []
        if restored is not None:
            self.state, data_state, meta = restored
            self.start = self.resumed_from = int(meta["step"])
            changes = _config_changes(meta.get("config", {}), config)
            self.feed = DataFeed(config, num_shards=data_state["num_shards"], rows=rows)
            stack.callback(self.feed.close)
            self.feed.set_state(data_state)
            if init_checkpoint:
                logging.warning("the workdir has checkpoints: --init_checkpoint ignored")
        else:
            graphdef, self.state, self.shardings = step_lib.init_state(config, mesh,
                                                                       self.trainable)
            self.start = 0
            self.feed = DataFeed(config, rows=rows)
            stack.callback(self.feed.close)
            if init_checkpoint:
                _init_params_from(init_checkpoint, self.state, config)
            if self.trainable is not None:  # the rows of the loaded model, not of the init
                modules.refresh_rows(self.state, self.shardings)
        _write_config(self.workdir, config)
        modules.record(self.workdir, self.trainable)

        self.total = config.train.steps
        self.writer = metrics_lib.MetricWriter(self.workdir, config, total_steps=self.total,
                                               start_step=self.start)
        stack.callback(self.writer.close)
        self.throughput = metrics_lib.Throughput(config, self.summary, mesh.size)
        if self.resumed_from is not None:
            self.writer.message(f"resumed from checkpoint {self.start} in "
                                f"{self.checkpointer.directory}")
            if changes:
                self.writer.message("config changed since the checkpoint: " + "; ".join(changes))
            self.writer.event(self.start, event="resume", config_changes=changes)
        else:
            self.writer.message(
                f"training {self.summary['total_params']:,} parameters "
                f"({self.summary['active_params']:,} active) on {mesh.size} devices "
                f"{dict(mesh.shape)} into {self.workdir}")
            self.writer.event(self.start, event="start", summary=self.summary)
        if self.trainable is not None:
            full = step_lib.abstract_state(config, mesh)[1]
            report = {"trainable_params": modules.trainable_params(abstract),
                      "optimizer_bytes": modules.state_bytes(abstract, "optimizer"),
                      "optimizer_bytes_full_training": modules.state_bytes(full, "optimizer")}
            self.writer.message(
                f"module fine-tuning: {self.trainable.describe(config)}; optimizer state "
                f"{report['optimizer_bytes']:,} bytes (training everything: "
                f"{report['optimizer_bytes_full_training']:,})")
            self.writer.event(self.start, event="module_fine_tuning", **report,
                              trainable=self.trainable.to_json())

        self.train_step = step_lib.make_train_step(config, graphdef, self.shardings, mesh)
        model_graphdef = nnx.split(nnx.eval_shape(lambda: step_lib.TrainState(config).model))[0]
        self.eval_step = step_lib.make_eval_step(config, model_graphdef, self.shardings["model"],
                                                 mesh)
        self.eval_batches = make_eval_batches(config, max_batches=config.train.eval_batches)
        self.flag = flag
        self.pending = None  # (step, device metrics, crc) of the newest dispatched step, unread
        self.stepped = False  # the first step's metrics have been read
        self.bad_reported = (0, -float("inf"))  # (bad records reported, time of the report)
        self.result = {"step": self.start, "loss": None, "eval_loss": None, "skipped_steps": 0,
                       "preempted": None, "resumed_from": self.resumed_from}

    def save(self, step_number: int):
        meta = {"summary": self.summary, "process_count": jax.process_count(),
                "mesh": dict(self.mesh.shape), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.flush()  # this step's record, and every earlier one, are durable with its checkpoint
        self.writer.sync()
        self.checkpointer.save(step_number, self.state, self.feed.get_state(), meta)

    def evaluate(self, step_number: int):
        self.result["eval_loss"] = None
        if self.eval_batches:
            out = _evaluate(self.eval_step, self.state["model"], self.eval_batches, self.mesh)
            self.result["eval_loss"] = out["eval_loss"]
            self.writer.write(step_number, out)

    def flush(self):
        """Reads and handles the metrics of the newest dispatched step, if not done yet."""
        if self.pending is None:
            return
        step_number, device_metrics, crc = self.pending
        self.pending = None
        self.stepped = True
        flat = metrics_lib.flatten(jax.device_get(device_metrics))
        flat["data_crc32"] = crc  # of process 0's rows: same data <=> same checksum
        flat.update(self.throughput.update(step_number))
        skipped = int(flat["skipped_steps"])
        self.result.update(step=step_number, loss=flat["loss"], skipped_steps=skipped)
        if not flat["step_ok"]:
            self.writer.message(f"step {step_number}: non-finite loss or gradient; step skipped "
                                f"({skipped} skipped so far)")
        if (step_number % self.config.train.log_every == 0 or step_number == self.total
                or not flat["step_ok"] or step_number == self.start + 1):
            if self.writer.active:
                flat["skipped_records"] = self.report_bad_records(step_number)
            self.writer.write(step_number, flat)
            self.checkpointer.check()  # a failed asynchronous save stops the run here
        bad = int(flat["bad_steps_in_a_row"])
        if bad >= self.config.train.max_bad_steps:
            raise TrainingError(
                f"{bad} steps in a row (up to step {step_number}) had a non-finite loss or "
                f"gradient (train.max_bad_steps = {self.config.train.max_bad_steps}); stopped "
                f"without saving; the newest checkpoint ({self.checkpointer.latest_step()}) is "
                f"the last good one")

    def report_bad_records(self, step_number: int, *, final: bool = False) -> int:
        """Bad data records skipped so far by this process's shards; a console line when there
        are new ones (at most one a minute, and one at the end of the run)."""
        stats, latest = self.feed.data_stats()
        total = int(stats.get("bad_records", 0))
        now = time.monotonic()
        if total > self.bad_reported[0] and (final or now - self.bad_reported[1] >= 60):
            reasons = ", ".join(f"{k[4:]} {v}" for k, v in sorted(stats.items())
                                if k.startswith("bad_") and k != "bad_records" and v)
            self.writer.message(
                f"step {step_number}: skipped {total - self.bad_reported[0]} bad data records "
                f"({total} so far: {reasons}); latest: {latest} (data.on_bad_record='skip'; "
                "counted in metrics.jsonl as skipped_records)")
            self.bad_reported = (total, now)
        return total

    def preempted(self, step_number: int, signum: int) -> dict:
        self.flush()
        self.save(step_number)
        self.checkpointer.wait()
        name = signal.Signals(signum).name
        self.writer.message(f"{name} received: saved checkpoint {step_number}; rerun the same "
                            f"command to resume")
        self.writer.event(step_number, event="preempted", signal=name)
        self.result.update(step=step_number, preempted=name)
        return self.result

    def run(self) -> dict:
        config, every = self.config, self.config.train.eval_every
        self.flag.start()
        if jax.process_count() > 1 and self.start < self.total:
            # Compile first, then wait for every process: a host that compiles slowly would
            # otherwise keep the others waiting in the first collective (gloo gives up after
            # 30 s; seen on a loaded CPU machine).
            self.train_step.compile(self.state)
            parallel.barrier("emo_jax_train_step_compiled")
        for step_number in range(self.start + 1, self.total + 1):
            host_batch = self.feed.next()
            crc = zlib.crc32(np.ascontiguousarray(host_batch["tokens"]).tobytes())
            self.state, device_metrics = self.train_step(
                self.state, parallel.host_to_global(host_batch, self.mesh))
            self.flush()  # the previous step's metrics, read while this step runs
            self.pending = (step_number, device_metrics, crc)
            if step_number == self.total:
                break
            if every and step_number % every == 0:
                self.flush()
                self.evaluate(step_number)
            if step_number % config.checkpoint.every == 0:
                self.save(step_number)
            signum = self.flag.stop_at(step_number)
            if signum is not None:
                return self.preempted(step_number, signum)
        self.flush()
        if self.start < self.total:
            self.evaluate(self.total)
            self.save(self.total)
        else:
            self.writer.message(f"already trained to step {self.start} (train.steps = "
                                f"{self.total}) in {self.workdir}")
        self.checkpointer.wait()
        skipped_records = self.report_bad_records(self.total, final=True)
        self.writer.event(self.total, event="done", loss=self.result["loss"],
                          eval_loss=self.result["eval_loss"],
                          skipped_steps=self.result["skipped_steps"],
                          skipped_records=skipped_records)
        self.result["step"] = max(self.start, self.total)
        return self.result


def train_and_evaluate(config, workdir: str, *, init_checkpoint: str | None = None,
                       trainable=None, train_router: str | None = None) -> dict:
    """Trains to `config.train.steps` in `workdir` (resuming if it holds checkpoints).

    init_checkpoint: start from its parameters; its model shape (`model_files.ADOPTED_KEYS`,
    e.g. the expert count of an extracted model) replaces the config's, with a logged note.
    trainable: a subset file (or Subset): module fine-tuning, only its experts train
    (emo_jax/train/modules.py; train_router 'rows' (default), 'all' or 'none').

    Returns {'step', 'loss', 'eval_loss', 'skipped_steps', 'preempted' (signal name or None),
    'resumed_from' (step or None)}. Raises ConfigError, DataError, CheckpointError (user
    mistakes: one sentence each) or TrainingError.
    """
    validate(config)
    if (storage.isfile(workdir) if storage.is_remote(workdir)
            else os.path.exists(workdir) and not os.path.isdir(workdir)):
        raise ConfigError(f"workdir '{workdir}' is a file, not a directory; give a new or an "
                          "existing directory")
    created = jax.process_index() == 0 and (
        not storage.exists(workdir) if storage.is_remote(workdir) else
        not os.path.lexists(workdir))
    flag = _SignalFlag(config.checkpoint.save_on_signal)
    run = None

    def exit_before_start(stop: StoppedBeforeStart):
        if created and _remove_new_workdir(workdir):
            stop.removed_workdir = workdir
        print(f"error: {stop.message()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + stop.signum)  # nothing to save, no state to keep: leave at once

    flag.exit_before_start = exit_before_start
    try:
        if init_checkpoint:
            config = model_files.adopt_shape(config, init_checkpoint)
        with contextlib.ExitStack() as stack:
            run = _Run(config, workdir, init_checkpoint, stack, flag, trainable, train_router)
            return run.run()
    except BaseException as err:
        if created and (run is None or not run.stepped) and _remove_new_workdir(workdir):
            if isinstance(err, StoppedBeforeStart):
                err.removed_workdir = workdir
        raise
    finally:
        flag.restore()


def _remove_new_workdir(workdir: str) -> bool:
    """Removes the workdir a run created and then failed in before its first step (it holds
    nothing but that run's config.json, start event and empty logs); never a checkpoint (a
    checkpoint directory of any state, complete or not, keeps the whole workdir)."""
    if storage.isdir(workdir) and not ckpt_lib.has_checkpoints(workdir):
        storage.rmtree(workdir, ignore_errors=True)
        return not storage.exists(workdir)
    return False
