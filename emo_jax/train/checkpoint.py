"""Training checkpoints: Orbax checkpoints of a training workdir, with exact resume.

Training workdir (`Checkpointer`, written by `train_and_evaluate`):

    WORKDIR/
      config.json                   the config of the latest run (process 0, at start)
      checkpoints/                  one Orbax CheckpointManager directory
        <step>/                     one checkpoint, finalised atomically by Orbax (written under a
                                    temporary name, renamed when complete; a killed save leaves
                                    no <step>/ behind)
          params/                   the model parameters: an Orbax PyTree (OCDBT) of the model's
                                    pure dict (`nnx.to_pure_dict`), e.g. blocks/moe/w_gate;
                                    expert stacks chunked one expert per chunk
                                    (`model_files.param_save_args`), so single experts can be read
          train_state/              everything else of the TrainState: optimizer (AdamW moments
                                    and counts), rng (the routing-pool PRNG key), step,
                                    bad_in_a_row, skipped
          data/                     JSON: the data iterators' states,
                                    {"num_shards": D, "shards": [state of shard 0, ...]}
          meta/                     JSON: step, config, model summary, process count, mesh, time
          _CHECKPOINT_METADATA, commit_success.txt   (Orbax)
      checkpoints_unreadable/<step>-<time>/   a checkpoint that failed to restore, moved aside
                                    (never deleted) once an older one restored in its place
      metrics.jsonl, tensorboard/   see metrics.py

Reading a model's parameters from a workdir (or a standalone model directory), writing model
directories and adopting a checkpoint's model shape live in emo_jax/model_files.py.

Every checkpoint's `meta` carries checksums of the arrays of params and train_state
(emo_jax/checksums.py: summed on the devices from the values being saved, before the
asynchronous save starts), verified after a restore: a mismatch counts as unreadable. A save
that fails (at once, or in Orbax's background thread: `check`, polled by the loop) raises
`SaveError` naming the checkpoint and the cause; the newest complete checkpoint stays intact.

Guarantees: a checkpoint of another model shape is refused with `CheckpointMismatchError`
naming the differing config keys and arrays; an unreadable or corrupt latest checkpoint is
reported (one warning line naming it, where it was moved and the step resumed from) and the
previous one used; nothing here deletes or overwrites a complete checkpoint (Orbax's
keep-last-K removes the oldest ones only after a newer one is complete). Everything is read
through Orbax and JSON; nothing is unpickled.
"""

from __future__ import annotations

import os
import re
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from emo_jax import checksums, parallel, storage
from emo_jax.model_files import (CHECKPOINTS, CheckpointError, CheckpointMismatchError,
                                 check_shapes, checkpoint_manager, config_dict,
                                 describe_failure, like_keys,
                                 param_save_args, str_keys)

UNREADABLE = "checkpoints_unreadable"
COMMIT_MARKER = "commit_success.txt"  # Orbax's mark of a complete checkpoint on object storage


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, quota); one sentence naming
    the checkpoint's path and the cause. The run stops (exit status 4)."""


def _limit_file_size(limit: int):
    """Test hook (checkpoint.inject_save_failure_step): from now on, writes past `limit` bytes of
    a file fail with EFBIG (OSError), as a full disk or a quota makes them fail."""
    import resource  # pylint: disable=g-import-not-at-top
    import signal  # pylint: disable=g-import-not-at-top

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _cause(err: BaseException) -> str:
    """The innermost cause of a failed save, in one line (Orbax wraps the OSError)."""
    seen = err
    while True:
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    if isinstance(err, OSError) or not isinstance(seen, OSError):
        seen = err if isinstance(err, OSError) else seen
    coded = re.search(r"os_error_code='(\d+)'", str(seen))
    if coded:  # TensorStore: 'Failed writing: "PATH": ...: File too large [os_error_code='27']'
        paths = re.findall(r'"(/[^"]+)"', str(seen))
        errno = int(coded.group(1))
        return (f"OSError: [Errno {errno}] {os.strerror(errno)}"
                + (f": {paths[-1]}" if paths else ""))
    if isinstance(seen, OSError) and seen.strerror:
        where = f": {seen.filename}" if seen.filename else ""
        return f"{type(seen).__name__}: [Errno {seen.errno}] {seen.strerror}{where}"
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.absolute(workdir), CHECKPOINTS)


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds any checkpoint directory (complete or not: a caller that would
    remove the workdir must leave it)."""
    d = checkpoint_dir(workdir)
    return storage.isdir(d) and any(n.isdigit() for n in storage.listdir(d))


def _split_state(state):
    """(params pure dict, train_state pure dict) of a TrainState's nnx.State."""
    pure = nnx.to_pure_dict(state)
    params = pure.pop("model")
    return params, pure


class Checkpointer:
    """The Orbax checkpoints of one training workdir: save, resume, fall back."""

    def __init__(self, workdir: str, config):
        self.workdir = storage.absolute(workdir)
        self.directory = checkpoint_dir(workdir)
        self.config = config
        self.manager = checkpoint_manager(self.directory, config.checkpoint.keep,
                                          config.checkpoint.async_save)
        self._saving = None  # the step of the newest save started
        self._started = []  # the steps of the saves started by this run

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> bool:
        """Starts saving checkpoint `step` (asynchronously if configured); False if it exists."""
        if step in self.manager.all_steps():
            return False
        params, rest = _split_state(state)
        params, rest = str_keys(params), str_keys(rest)
        sums = checksums.record(dict(checksums.tree_checksums(params, "params"),
                                     **checksums.tree_checksums(rest, "train_state",
                                                                units=False)))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params, save_args=param_save_args(params)),
            train_state=ocp.args.StandardSave(rest),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(dict(meta, step=step, config=config_dict(self.config),
                                        checksums=sums)))
        self.check()  # an earlier asynchronous save that failed stops the run first
        self._saving = step
        self._started.append(step)
        if step == self.config.checkpoint.inject_save_failure_step:
            _limit_file_size(64 * 1024)
        try:
            self.manager.save(step, args=args)
        except Exception as err:  # noqa: BLE001 (disk full, permissions, quota, ...)
            raise self._save_error(self._failed_step(), err) from None  # maybe an earlier one
        return True

    def _save_error(self, step: int, err: BaseException) -> "SaveError":
        where = storage.join(self.directory, str(step))
        latest = [s for s in self._complete_steps() if s != step]
        kept = (f"the newest complete checkpoint is {max(latest)}" if latest
                else "no complete checkpoint was written")
        return SaveError(f"saving checkpoint {where} failed: {_cause(err)}; {kept} (rerun to "
                         "resume from it once the cause is fixed)")

    def _complete_steps(self) -> list[int]:
        """Steps whose directory is final (Orbax renames it into place when complete on a disk,
        and marks it with commit_success.txt on object storage; its own step list includes
        saves still in progress)."""
        try:
            names = [n for n in storage.listdir(self.directory) if n.isdigit()]
        except OSError:
            return []
        if storage.is_remote(self.directory):
            names = [n for n in names if storage.exists(
                storage.join(self.directory, n, COMMIT_MARKER))]
        return [int(n) for n in names]

    def _failed_step(self) -> int | None:
        """The oldest save this run started that is not complete (saves finish in order)."""
        done = set(self._complete_steps())
        pending = [s for s in self._started if s not in done]
        return min(pending) if pending else self._saving

    def check(self):
        """Raises SaveError if an asynchronous save failed (cheap; the loop polls it)."""
        try:
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(self._failed_step(), err) from None

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(self._failed_step(), err) from None

    def close(self):
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 (reported by wait or check, or the run failed anyway)
            pass
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass

    def _restore_step(self, step: int, abstract_state):
        where = storage.join(self.directory, str(step))
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        target_params, target_rest = _split_state(abstract_state)
        saved = self.manager.item_metadata(step)
        check_shapes(saved["params"], str_keys(target_params), where, meta.get("config"),
                     self.config)
        check_shapes(saved["train_state"], str_keys(target_rest), where, meta.get("config"),
                     self.config, prefix="train_state")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(str_keys(target_params)),
            train_state=ocp.args.StandardRestore(str_keys(target_rest)),
            data=ocp.args.JsonRestore()))
        checksums.verify(restored["params"], "params", meta.get("checksums"))
        checksums.verify(restored["train_state"], "train_state", meta.get("checksums"))
        pure = dict(like_keys(restored["train_state"], target_rest),
                    model=like_keys(restored["params"], target_params))
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, pure)
        return state, restored["data"], meta

    def restore_latest(self, abstract_state):
        """(state, data_state, meta) of the newest readable checkpoint, or None if there is none.

        An unreadable checkpoint is reported and the next older one tried; once one restores,
        the unreadable newer ones are moved to checkpoints_unreadable/ (so new saves can take
        their step numbers). A model-shape mismatch is raised, never skipped.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for step in steps:
            try:
                result = self._restore_step(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 (any failure to read means: unreadable)
                failed.append((step, describe_failure(err)))
                continue
            if failed:
                moved = self._set_aside([s for s, _ in failed])
                for (bad, (state, reason)), target in zip(failed, moved):
                    logging.warning("checkpoint %s/%d is %s (%s); moved it to %s; resuming from "
                                    "step %d", self.directory, bad, state, reason, target, step)
            return result
        if failed:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps "
                f"{', '.join(str(s) for s, _ in failed)}; newest is {failed[0][1][0]}: {failed[0][1][1]}); move "
                f"the directory away to start afresh")
        return None

    def _set_aside(self, steps):
        """Moves unreadable checkpoints to checkpoints_unreadable/<step>-<time>/ (process 0).

        On a disk: one rename each. On object storage (no rename): copied there first, and the
        original removed only once the copy is complete, so its bytes are never lost (a kill
        in between leaves the original, moved again by the next run)."""
        aside = storage.join(self.workdir, UNREADABLE)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        targets = [storage.join(aside, f"{step}-{stamp}") for step in steps]
        if jax.process_index() == 0:
            storage.makedirs(aside)
            for step, target in zip(steps, targets):
                source = storage.join(self.directory, str(step))
                if storage.is_remote(source):
                    storage.copytree(source, target)
                    storage.rmtree(source)
                else:
                    os.rename(source, target)
        parallel.barrier("emo_jax_checkpoint_set_aside")
        self.manager.reload()
        return targets
