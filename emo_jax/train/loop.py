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

A step whose loss or gradient is not finite is skipped by the step itself; here it is
reported, and `train.max_bad_steps` of them in a row stop the run with `TrainingError` without
saving (the last checkpoint, taken before, stays the newest).

This module never builds the model or the optimiser itself (step.py) and never formats files
(checkpoint.py, metrics.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
import zlib

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from emo_jax import parallel
from emo_jax.config import validate
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import metrics as metrics_lib
from emo_jax.train import step as step_lib
from emo_jax.train.feed import DataFeed


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); one clear sentence."""


class _SignalFlag:
    """Records SIGTERM/SIGINT instead of dying; a second signal of the same kind acts at once."""

    def __init__(self, enabled: bool):
        self.signum = None
        self.previous = {}
        if enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[signum] = signal.signal(signum, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: default behaviour
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def any_process(self) -> int | None:
        """The signal number if any process got one (a collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self.signum
        flags = multihost_utils.process_allgather(np.array([self.signum or 0], np.int32))
        flags = np.asarray(flags).reshape(-1)
        return int(flags.max()) or None

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
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))
        os.replace(path + ".tmp", path)


def _init_params_from(path: str, state, config):
    """Replaces the model parameters of a fresh state by those of a checkpoint or model dir."""
    target = nnx.to_pure_dict(state["model"])
    pure, _, meta = ckpt_lib.load_params(path, target, config)
    nnx.replace_by_pure_dict(state["model"], pure)
    return meta


def train_and_evaluate(config, workdir: str, *, init_checkpoint: str | None = None) -> dict:
    """Trains to `config.train.steps` in `workdir` (resuming if it holds checkpoints).

    Returns {'step', 'loss', 'eval_loss', 'skipped_steps', 'preempted' (signal name or None),
    'resumed_from' (step or None)}.
    """
    validate(config)
    from emo_jax.data.tokenizers import check_vocab, make_tokenizer
    from emo_jax.model.summary import summarize

    check_vocab(make_tokenizer(config.data.tokenizer), config.model.vocab_size)
    mesh = parallel.make_mesh(config)
    parallel.check_batch(config, mesh)
    parallel.check_experts(config, mesh)
    rows = parallel.process_rows(mesh, config.data.batch_size)
    if rows.size == 0 or not np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        raise TrainingError("this process's batch rows are not one contiguous block of the "
                            "global batch; build the mesh from jax.devices() in their order")
    rows = (int(rows[0]), int(rows[0] + rows.size))
    workdir = os.path.abspath(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    summary = summarize(config)
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    graphdef, abstract, shardings = step_lib.abstract_state(config, mesh)

    restored = checkpointer.restore_latest(abstract)
    resumed_from = None
    if restored is not None:
        state, data_state, meta = restored
        start = int(meta["step"])
        resumed_from = start
        feed = DataFeed(config, num_shards=data_state["num_shards"], rows=rows)
        feed.set_state(data_state)
        if init_checkpoint:
            logging.info("workdir has checkpoints: --init_checkpoint ignored (resuming)")
    else:
        graphdef, state, shardings = step_lib.init_state(config, mesh)
        start = 0
        feed = DataFeed(config, rows=rows)
        if init_checkpoint:
            _init_params_from(init_checkpoint, state, config)
    _write_config(workdir, config)

    total = config.train.steps
    writer = metrics_lib.MetricWriter(workdir, config, total_steps=total, start_step=start)
    throughput = metrics_lib.Throughput(config, summary, mesh.size)
    if resumed_from is not None:
        writer.message(f"resumed from checkpoint {resumed_from} in {checkpointer.directory}")
        writer.event(start, event="resume")
    else:
        writer.message(f"training {summary['total_params']:,} parameters "
                       f"({summary['active_params']:,} active) on {mesh.size} devices "
                       f"{dict(mesh.shape)} into {workdir}")
        writer.event(start, event="start", summary=summary)

    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    model_graphdef = nnx.split(nnx.eval_shape(lambda: step_lib.TrainState(config).model))[0]
    eval_step = step_lib.make_eval_step(config, model_graphdef, shardings["model"], mesh)
    from emo_jax.data.pipeline import make_eval_batches

    eval_batches = make_eval_batches(config, max_batches=config.train.eval_batches)
    flag = _SignalFlag(config.checkpoint.save_on_signal)
    result = {"step": start, "loss": None, "eval_loss": None, "skipped_steps": 0,
              "preempted": None, "resumed_from": resumed_from}

    def ckpt_meta():
        return {"summary": summary, "process_count": jax.process_count(),
                "mesh": dict(mesh.shape), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(step_number):
        if checkpointer.save(step_number, state, feed.get_state(), ckpt_meta()):
            logging.info("checkpoint %d started", step_number)

    def handle(step_number, host_metrics, data_crc32):
        """Everything done with a finished step's metrics (on the host)."""
        flat = metrics_lib.flatten(host_metrics)
        flat["data_crc32"] = data_crc32  # of process 0's rows: same data <=> same checksum
        flat.update(throughput.update(step_number))
        result.update(step=step_number, loss=flat["loss"], skipped_steps=int(flat["skipped_steps"]))
        if not flat["step_ok"]:
            writer.message(f"step {step_number}: non-finite loss or gradient; step skipped "
                           f"({int(flat['skipped_steps'])} skipped so far)")
        log_now = (step_number % config.train.log_every == 0 or step_number == total
                   or not flat["step_ok"] or step_number == start + 1)
        if log_now:
            writer.write(step_number, flat)
        if flat["bad_steps_in_a_row"] >= config.train.max_bad_steps:
            raise TrainingError(
                f"{int(flat['bad_steps_in_a_row'])} steps in a row (up to step {step_number}) "
                f"had a non-finite loss or gradient (train.max_bad_steps = "
                f"{config.train.max_bad_steps}); stopped without saving; the newest checkpoint "
                f"({checkpointer.latest_step()}) is the last good one")

    def evaluate(step_number):
        result["eval_loss"] = None
        if not eval_batches:
            return
        out = _evaluate(eval_step, state["model"], eval_batches, mesh)
        result["eval_loss"] = out["eval_loss"]
        writer.write(step_number, out)

    pending = None  # (step, device metrics, crc) of the newest dispatched step, not yet read

    def flush():
        nonlocal pending
        if pending is not None:
            step_number, device_metrics, crc = pending
            pending = None
            handle(step_number, jax.device_get(device_metrics), crc)

    try:
        for step_number in range(start + 1, total + 1):
            host_batch = feed.next()
            crc = zlib.crc32(np.ascontiguousarray(host_batch["tokens"]).tobytes())
            state, device_metrics = train_step(state, parallel.host_to_global(host_batch, mesh))
            flush()  # the previous step's metrics, read while this step runs
            pending = (step_number, device_metrics, crc)
            if step_number == total:
                break
            if config.train.eval_every and step_number % config.train.eval_every == 0:
                flush()
                evaluate(step_number)
            if step_number % config.checkpoint.every == 0:
                save(step_number)
            signum = flag.any_process()
            if signum is not None:
                flush()
                save(step_number)
                checkpointer.wait()
                name = signal.Signals(signum).name
                writer.message(f"{name} received: saved checkpoint {step_number}; rerun the "
                               f"same command to resume")
                writer.event(step_number, event="preempted", signal=name)
                result.update(step=step_number, preempted=name)
                return result
        flush()
        if start < total:
            evaluate(total)
            save(total)
        else:
            writer.message(f"already trained to step {start} (train.steps = {total}) in {workdir}")
        checkpointer.wait()
        writer.event(total, event="done", **{k: v for k, v in result.items()
                                             if k in ("loss", "eval_loss", "skipped_steps")})
        result["step"] = max(start, total)
        return result
    finally:
        flag.restore()
        try:
            checkpointer.close()
        finally:
            writer.close()
            feed.close()
