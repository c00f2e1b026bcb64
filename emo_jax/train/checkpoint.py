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

Guarantees: a checkpoint of another model shape is refused with `CheckpointMismatchError`
naming the differing config keys and arrays; an unreadable latest checkpoint is reported and
the previous one used; nothing here deletes or overwrites a complete checkpoint (Orbax's
keep-last-K removes the oldest ones only after a newer one is complete). Everything is read
through Orbax and JSON; nothing is unpickled.
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from emo_jax import parallel
from emo_jax.model_files import (CHECKPOINTS, CheckpointError, CheckpointMismatchError,
                                 check_shapes, checkpoint_manager, config_dict, like_keys,
                                 param_save_args, str_keys)

UNREADABLE = "checkpoints_unreadable"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def has_checkpoints(workdir: str) -> bool:
    d = checkpoint_dir(workdir)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _split_state(state):
    """(params pure dict, train_state pure dict) of a TrainState's nnx.State."""
    pure = nnx.to_pure_dict(state)
    params = pure.pop("model")
    return params, pure


class Checkpointer:
    """The Orbax checkpoints of one training workdir: save, resume, fall back."""

    def __init__(self, workdir: str, config):
        self.workdir = os.path.abspath(workdir)
        self.directory = checkpoint_dir(workdir)
        self.config = config
        self.manager = checkpoint_manager(self.directory, config.checkpoint.keep,
                                          config.checkpoint.async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> bool:
        """Starts saving checkpoint `step` (asynchronously if configured); False if it exists."""
        if step in self.manager.all_steps():
            return False
        params, rest = _split_state(state)
        params = str_keys(params)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params, save_args=param_save_args(params)),
            train_state=ocp.args.StandardSave(str_keys(rest)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(dict(meta, step=step, config=config_dict(self.config))))
        self.manager.save(step, args=args)
        return True

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def _restore_step(self, step: int, abstract_state):
        where = os.path.join(self.directory, str(step))
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
                reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                logging.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                                self.directory, step, type(err).__name__, reason)
                failed.append((step, f"{type(err).__name__}: {reason}"))
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            return result
        if failed:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps "
                f"{', '.join(str(s) for s, _ in failed)}; newest error: {failed[0][1]}); move "
                f"the directory away to start afresh")
        return None

    def _set_aside(self, steps):
        if jax.process_index() == 0:
            aside = os.path.join(self.workdir, UNREADABLE)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(os.path.join(self.directory, str(step)), target)
                logging.warning("moved unreadable checkpoint %d to %s", step, target)
        parallel.barrier("emo_jax_checkpoint_set_aside")
        self.manager.reload()
