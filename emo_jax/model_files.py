"""The on-disk model format, and reading a model's parameters from any emo_jax checkpoint.

Standalone model directory (`save_model`; what the extract, convert and compose tools write):

    MODEL/
      params/                       Orbax PyTree (OCDBT) of the model's pure dict
                                    (`nnx.to_pure_dict`), e.g. blocks/moe/w_gate; arrays of the
                                    stacked blocks chunked one layer per chunk and the expert
                                    stacks one expert of one layer per chunk (`param_save_args`),
                                    so single experts can be read
      config.json                   the full config (`ConfigDict.to_json`); `data.tokenizer`
                                    names the files in tokenizer/ relative to MODEL
      tokenizer/                    the tokenizer's files (SentencePiece .model, or
                                    tokenizer.json and its companions); absent for 'byte'
      metadata.json                 {"format": "emo_jax.model", "format_version": 1, "step",
                                     "summary": {...}, ...caller's metadata}
      checksums.json                checksums of every array's values (emo_jax/checksums.py),
                                    verified on restore; absent in directories written before
                                    them (read unverified)

A training workdir (emo_jax/train/checkpoint.py) holds the same params tree in every
`checkpoints/<step>/params/` item, next to `meta/` (JSON: step, config, ...); the other items
(optimizer, data iterators) are the training checkpointer's business.

`save_params` writes a model directory from a params pure dict (any dtype), `locate_params`
finds a checkpoint's params item for tools that read arrays themselves.

`restore_model(path)` reads either (a workdir's latest readable checkpoint, a workdir's
`checkpoints/<step>` directory, or a model directory) and returns `(model, config, metadata)`;
a model directory also works as `--init_checkpoint` for training, whose run adopts the model
shape saved with it (`adopt_shape`).

Guarantees: a checkpoint of another model shape is refused with `CheckpointMismatchError`
naming the differing config keys and arrays; an unreadable or corrupt (checksum mismatch)
latest checkpoint of a workdir is reported in one warning line naming it and the step used
instead, and the previous one used; an explicit step or a model directory that is unreadable
or corrupt raises CheckpointError naming it; nothing here deletes or overwrites a complete checkpoint or model.
Everything is read through Orbax and JSON; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from emo_jax import checksums, parallel, storage
from emo_jax.config import SHAPE_KEYS, ConfigError, default_config, validate
from emo_jax.data import tokenizers
from emo_jax.model.summary import summarize
from emo_jax.model.transformer import Transformer
from emo_jax.model.model_config import ModelConfig

# The directory of a training workdir that holds its Orbax checkpoints.
CHECKPOINTS = "checkpoints"
MODEL_FORMAT = "emo_jax.model"
MODEL_FORMAT_VERSION = 1
# Stacked expert weights [L, E, ...] of blocks/moe: chunked one expert per chunk on disk.
EXPERT_STACKS = ("w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")

# The file of a model directory written last: a directory without it is incomplete (on object
# storage, where a directory cannot be renamed into place, it is the only completion mark).
MODEL_MARKER = "metadata.json"
# On object storage, the first file of a model directory being written: a directory with it and
# without MODEL_MARKER is the remains of an interrupted save (removed by the next save).
WRITING_MARKER = "WRITING"

# Config keys a run started from --init_checkpoint takes from the checkpoint's config: the
# parameter shapes, and top_k (an extracted model's is min(top_k, K - shared)).
ADOPTED_KEYS = SHAPE_KEYS + ("moe.top_k",)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds a model of another shape than the config describes."""


def describe_failure(err: BaseException) -> tuple[str, str]:
    """('corrupt' | 'unreadable', one-line reason) of a checkpoint that failed to restore."""
    if isinstance(err, checksums.ChecksumMismatch):
        return "corrupt", str(err)
    text = str(err).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0][:300] if text else ""
    return "unreadable", f"{type(err).__name__}: {first}" if first else type(err).__name__


# ---------------------------------------------------------------------------- pytrees


def str_keys(tree):
    """Orbax wants string dict keys (optax tuples become int keys in pure dicts)."""
    if isinstance(tree, dict):
        return {str(k): str_keys(v) for k, v in tree.items()}
    return tree


def like_keys(tree, like):
    """Gives `tree` (string keys, from Orbax) the key types of `like`."""
    if isinstance(like, dict):
        return {k: like_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def _flat_shapes(tree, prefix: str) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join([prefix] + [str(getattr(k, "key", getattr(k, "idx", k))) for k in path])
        out[name] = tuple(leaf.shape)
    return out


def config_dict(config) -> dict:
    return json.loads(config.to_json())


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A full config from a saved one: defaults for keys it lacks, its values for the rest.

    Keys that no longer exist are dropped with a warning; the result is validated.
    """
    config = default_config()
    for section, values in saved.items():
        if section not in config or not isinstance(values, dict):
            logging.warning("checkpoint config: ignoring unknown section '%s'", section)
            continue
        for key, value in values.items():
            if key not in config[section]:
                logging.warning("checkpoint config: ignoring unknown key '%s.%s'", section, key)
                continue
            if isinstance(value, dict):
                for sub, subvalue in value.items():
                    config[section][key][sub] = subvalue
            else:
                config[section][key] = tuple(value) if isinstance(value, list) else value
    return validate(config)


def check_shapes(saved_tree, target_tree, where: str, saved_config: dict | None, config,
                 prefix: str = "params"):
    """Raises CheckpointMismatchError naming config keys and arrays that differ."""
    saved, target = _flat_shapes(saved_tree, prefix), _flat_shapes(target_tree, prefix)
    problems = []
    for name in sorted(set(saved) | set(target)):
        if name not in saved:
            problems.append(f"{name} missing in the checkpoint")
        elif name not in target:
            problems.append(f"{name} not in this model")
        elif saved[name] != target[name]:
            problems.append(f"{name} is {saved[name]} there but {target[name]} here")
    if not problems:
        return
    keys = []
    if saved_config is not None:
        now = config_dict(config)
        keys = [f"{k}={_get(saved_config, k)!r} there but {_get(now, k)!r} here"
                for k in SHAPE_KEYS if _get(saved_config, k) != _get(now, k)]
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6
                                       else "")
    raise CheckpointMismatchError(
        f"checkpoint {where} holds a model of another shape"
        + (f" (config {', '.join(keys)})" if keys else "")
        + f": {shown}. Use the config it was trained with, or another --workdir.")


# ---------------------------------------------------------------------------- reading


def checkpoint_manager(directory: str, keep: int | None, async_save: bool,
                       read_only: bool = False):
    """The Orbax manager of a workdir's checkpoints directory (the items of a checkpoint:
    params, train_state, data, meta; see emo_jax/train/checkpoint.py). Tools open it
    read-only: a read-only manager never cleans up the temporary directory of a save still in
    progress."""
    parallel.use_distributed_barriers()
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "train_state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1)
    verbosity = logging.get_verbosity()
    if read_only:  # Orbax warns that a read-only directory is read-only
        logging.set_verbosity(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    finally:
        logging.set_verbosity(verbosity)


def default_mesh(config):
    """All devices on the 'data' axis (parameters replicated): the mesh tools use by default."""
    flat = ml_collections.ConfigDict(config.to_dict())
    flat.mesh.data, flat.mesh.fsdp, flat.mesh.expert = -1, 1, 1
    return parallel.make_mesh(flat)


def model_mesh(model):
    """The mesh a restored model's parameters live on."""
    return jax.tree.leaves(nnx.state(model))[0].sharding.mesh


def abstract_model(config, mesh):
    """(graphdef, abstract params nnx.State with shardings on `mesh`)."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0))))
    shardings = parallel.state_shardings(state, mesh, config)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state


def _resolve(path: str, step: int | None):
    """('model', dir, None) or ('workdir', checkpoints dir, step or None)."""
    path = storage.absolute(path)
    meta_path = storage.join(path, MODEL_MARKER)
    if storage.isfile(meta_path):  # written last: the model directory is complete
        return "model", path, None
    if storage.isdir(storage.join(path, CHECKPOINTS)):
        return "workdir", storage.join(path, CHECKPOINTS), step
    base = storage.basename(path)
    if base.isdigit() and storage.isdir(path):
        return "workdir", storage.dirname(path), int(base) if step is None else step
    if storage.isdir(path) and any(n.isdigit() for n in storage.listdir(path)):
        return "workdir", path, step
    raise CheckpointError(
        f"no emo_jax checkpoint at {path}: expected a training workdir (with {CHECKPOINTS}/), "
        f"one of its {CHECKPOINTS}/<step> directories, or a model directory (with metadata.json)")


def load_params(path: str, target_params, config, *, step: int | None = None):
    """(params pure dict matching `target_params`, saved config dict, metadata) from any
    checkpoint `restore_model` accepts; a different model shape raises CheckpointMismatchError.
    """
    kind, directory, step = _resolve(path, step)
    target = str_keys(target_params)
    if kind == "model":
        saved_config = json.loads(storage.read_text(storage.join(directory, "config.json")))
        metadata = json.loads(storage.read_text(storage.join(directory, MODEL_MARKER)))
        if metadata.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{directory}/metadata.json is not an emo_jax model "
                                  f"(format {metadata.get('format')!r})")
        checkpointer = ocp.StandardCheckpointer()
        params_dir = storage.join(directory, "params")
        check_shapes(checkpointer.metadata(params_dir).item_metadata, target, directory,
                     saved_config, config)
        try:
            restored = checkpointer.restore(params_dir, target)
            checksums.verify(restored, "params", read_checksums(directory))
        except Exception as err:  # noqa: BLE001
            state, reason = describe_failure(err)
            raise CheckpointError(f"model directory {directory} is {state}: {reason}") from None
        return like_keys(restored, target_params), saved_config, dict(metadata, kind="model",
                                                                      path=directory)
    manager = checkpoint_manager(directory, None, False, read_only=True)
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")

    def read(s, where):
        meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_shapes(manager.item_metadata(s)["params"], target, where, meta.get("config"),
                     config)
        restored = manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
        checksums.verify(restored, "params", meta.get("checksums"))
        return meta, restored

    s, where, (meta, restored) = _newest_readable(directory, steps, step, read)
    metadata = {k: v for k, v in meta.items() if k not in ("config", "checksums")}
    return (like_keys(restored, target_params), meta["config"],
            dict(metadata, kind="workdir", path=where, step=s))


def _saved_config(path: str, step: int | None) -> dict:
    kind, directory, step = _resolve(path, step)
    if kind == "model":
        saved = json.loads(storage.read_text(storage.join(directory, "config.json")))
        data = saved.get("data")
        if isinstance(data, dict) and isinstance(data.get("tokenizer"), str):
            # the tokenizer's files live in the model directory, named relative to it
            data["tokenizer"] = tokenizers.resolve_spec(data["tokenizer"], directory)
        return saved
    manager = checkpoint_manager(directory, None, False, read_only=True)
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for s in steps:
        try:
            meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return meta["meta"]["config"]
        except Exception:  # noqa: BLE001 (load_params reports which one is unreadable)
            continue
    raise CheckpointError(f"no readable checkpoint in {directory}")


def adopt_shape(config, path: str):
    """`config` with the model shape of the checkpoint at `path` (ADOPTED_KEYS), so that e.g. an
    extracted model (fewer experts) fine-tunes without --config.moe.num_experts=K. A config
    left at the default tokenizer ('byte') also takes the checkpoint's `data.tokenizer` when
    its files exist (a model directory's own `tokenizer/`). Logs each key it changes; returns
    a validated copy (or `config` itself when nothing changes)."""
    try:
        saved = _saved_config(path, None)
    except CheckpointError:
        return config  # load_params reports the missing or unreadable checkpoint
    now = config_dict(config)
    changes = [(k, _get(now, k), _get(saved, k)) for k in ADOPTED_KEYS
               if _get(saved, k) is not None and _get(saved, k) != _get(now, k)]
    saved_tokenizer = _get(saved, "data.tokenizer")
    if (config.data.tokenizer == "byte" and isinstance(saved_tokenizer, str)
            and tokenizers.spec_files(saved_tokenizer)):
        # a run left at the default tokenizer uses the checkpoint's (files that exist)
        changes.append(("data.tokenizer", "byte", saved_tokenizer))
    if not changes:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for key, _, value in changes:
        section, name = key.split(".")
        config[section][name] = value
    logging.warning("--init_checkpoint=%s: adopted its model shape: %s", path,
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes))
    try:
        return validate(config)
    except ConfigError as err:
        raise CheckpointError(f"the config with the model shape of --init_checkpoint={path} "
                              f"is invalid: {err}") from err


def _newest_readable(directory: str, steps, step: int | None, read):
    """(s, where, read(s, where)) of the first of `steps` whose read succeeds.

    A failed read of a step the user named (`step`) raises CheckpointError in one line; else
    the step is skipped, and once a step reads, each skipped one gets one warning line naming
    it and the step used. A model of another shape (CheckpointMismatchError) always raises, and
    so does a directory where no step reads.
    """
    failures = []
    for s in steps:
        where = storage.join(directory, str(s))
        try:
            value = read(s, where)
        except CheckpointMismatchError:
            raise
        except Exception as err:  # noqa: BLE001
            state, reason = describe_failure(err)
            if step is not None:
                raise CheckpointError(f"checkpoint {where} is {state}: {reason}") from None
            failures.append((where, state, reason))
            continue
        for bad, state, reason in failures:  # one line each, now that the step used is known
            logging.warning("checkpoint %s is %s (%s); using step %d instead", bad, state,
                            reason, s)
        return s, where, value
    if not failures:
        raise CheckpointError(f"no readable checkpoint in {directory}")
    raise CheckpointError(
        f"no readable checkpoint in {directory} (tried "
        f"{', '.join(storage.basename(w) for w, _, _ in failures)}; newest is {failures[0][1]}: "
        f"{failures[0][2]})")


def locate_params(path: str, step: int | None = None) -> tuple[str, dict, dict]:
    """(params item directory, saved config dict, metadata) of any checkpoint restore_model
    accepts, without reading an array: for tools that read the arrays themselves (partial reads
    of emo_jax/modular/lazy.py). A workdir gives its newest checkpoint with readable metadata."""
    kind, directory, step = _resolve(path, step)
    if kind == "model":
        metadata = json.loads(storage.read_text(storage.join(directory, MODEL_MARKER)))
        if metadata.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{directory}/metadata.json is not an emo_jax model "
                                  f"(format {metadata.get('format')!r})")
        return (storage.join(directory, "params"), _saved_config(directory, None),
                dict(metadata, kind="model", path=directory,
                     checksums=read_checksums(directory)))
    manager = checkpoint_manager(directory, None, False, read_only=True)
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    def read(s, where):
        return manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    s, where, meta = _newest_readable(directory, steps, step, read)
    metadata = {k: v for k, v in meta.items() if k != "config"}
    return (storage.join(where, "params"), meta["config"],
            dict(metadata, kind="workdir", path=where, step=s))


def restore_model(path: str, step: int | None = None, mesh=None):
    """(model, config, metadata) from a training workdir (its latest readable checkpoint, or
    `step`), a workdir's checkpoints/<step> directory, or a standalone model directory.

    The parameters are placed on `mesh` by the config's sharding rules; default: all devices on
    the 'data' axis (replicated). Call the model under `jax.set_mesh(mesh)` (the mesh is
    `model_mesh(model)`). metadata: step, summary, kind ('workdir' | 'model'), path, and what
    the checkpoint's writer added.
    """
    try:
        config = config_from_dict(_saved_config(path, step))
    except ConfigError as err:
        raise CheckpointError(f"the config saved in {path} is invalid: {err}") from err
    mesh = default_mesh(config) if mesh is None else mesh
    graphdef, abstract = abstract_model(config, mesh)
    pure, _, metadata = load_params(path, nnx.to_pure_dict(abstract), config, step=step)
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract), config, metadata


# ---------------------------------------------------------------------------- writing


def param_save_args(params: dict):
    """Orbax SaveArgs for a params pure dict: how each array is chunked on disk.

    Arrays of the stacked blocks are chunked one layer per chunk, and the routed and shared
    expert stacks ([L, R, ...]) one expert of one layer per chunk, so a reader can fetch single
    experts without decoding their neighbours (lazy extraction, emo_jax/modular/lazy.py). The
    other arrays keep Orbax's default (the written shard, at most 2 GiB per chunk).
    """
    def one(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[0] != "blocks":
            return ocp.SaveArgs()
        if names[-1] in EXPERT_STACKS:
            return ocp.SaveArgs(shard_axes=(0, 1))
        return ocp.SaveArgs(shard_axes=(0,))

    return jax.tree_util.tree_map_with_path(one, params)


def read_checksums(directory: str) -> dict | None:
    """The checksums record of a model directory (None: written before checksums existed)."""
    path = storage.join(directory, checksums.FILE)
    if not storage.isfile(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable: {type(err).__name__}: {err}") from None


def write_checksums(directory: str, arrays: dict):
    """Writes a model directory's checksums.json ({name: entry} of `checksums.tree_checksums`)."""
    storage.write_text(storage.join(directory, checksums.FILE),
                       json.dumps(checksums.record(arrays), indent=1, sort_keys=True))


def save_model(path: str, model, config, metadata: dict | None = None, *,
               overwrite: bool = False):
    """Writes a standalone params-only model directory (layout in the module docstring).

    Atomic: written to PATH.partial, then renamed to PATH. An existing PATH is refused unless
    `overwrite` (then it is replaced only once the new one is complete). Every process calls it.
    """
    return save_params(path, nnx.to_pure_dict(nnx.state(model)), config, metadata,
                       overwrite=overwrite)


def save_params(path: str, params: dict, config, metadata: dict | None = None, *,
                overwrite: bool = False, finish: bool = True):
    """`save_model` of a params pure dict (jax or NumPy arrays, in any dtype: restore_model
    casts to float32) instead of a model: what tools that never build the model write.

    On object storage (gs://, s3://; no rename) the directory is written in place and is
    complete once its metadata.json, written last, exists (`_save_params_remote`); there
    `finish=False` leaves it incomplete (metadata.json held back as metadata.json.pending) for a
    writer that rewrites arrays in place and then calls `finish_model` (lazy extraction)."""
    if storage.is_remote(path):
        return _save_params_remote(storage.absolute(path), params, config, metadata,
                                   overwrite=overwrite, finish=finish)
    if not finish:
        raise ValueError("save_params(finish=False) is for object storage only")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} exists; choose another path or pass overwrite=True")
    partial = path + ".partial"
    if jax.process_index() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)  # an earlier interrupted save: never a complete model
    parallel.barrier("emo_jax_save_model_start")
    params = str_keys(params)
    sums = checksums.tree_checksums(params, "params")  # every process (a collective)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(partial, "params"), params,
                      save_args=param_save_args(params))
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        _write_model_files(partial, config, metadata, sums)
        if os.path.exists(path):
            old = path + f".old-{os.getpid()}"
            os.rename(path, old)
            os.rename(partial, path)
            shutil.rmtree(old)
        else:
            os.rename(partial, path)
    parallel.barrier("emo_jax_save_model_end")
    return path


def _write_model_files(directory: str, config, metadata: dict | None, sums: dict,
                       finish: bool = True):
    """The files of a model directory beside params/ (process 0): tokenizer/, config.json,
    checksums.json, and metadata.json last (the completion mark, MODEL_MARKER)."""
    info = dict(metadata or {}, format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION,
                summary=summarize(ModelConfig.from_config(config), config.data.seq_len),
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    spec = tokenizers.bundle_spec(config.data.tokenizer, directory)  # tokenizer/ travels
    if spec != config.data.tokenizer:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.tokenizer = spec
    storage.write_text(storage.join(directory, "config.json"), config.to_json(indent=2))
    write_checksums(directory, sums)
    storage.write_text(storage.join(directory, MODEL_MARKER + ("" if finish else ".pending")),
                       json.dumps(info, indent=2, sort_keys=True))


def finish_model(path: str):
    """Completes a model directory written with `save_params(finish=False)` on object storage:
    metadata.json (the completion mark) goes in last, then the WRITING mark goes."""
    pending = storage.join(path, MODEL_MARKER + ".pending")
    storage.write_text(storage.join(path, MODEL_MARKER), storage.read_text(pending))
    storage.remove(pending)
    storage.remove(storage.join(path, WRITING_MARKER))


def _save_params_remote(path: str, params: dict, config, metadata: dict | None, *,
                        overwrite: bool, finish: bool = True):
    """save_params on object storage, where nothing can be renamed into place.

    A new model is written straight into PATH: first a WRITING mark, then params/ (Orbax), the
    other files, metadata.json last (from then on the directory is complete), then the mark is
    removed. A PATH holding a WRITING mark but no metadata.json is what an interrupted save
    left: it is written over. Replacing a complete model (`overwrite`) writes the new one
    complete into PATH.partial first; only then is the old one taken down (its metadata.json
    first) and the new one copied into PATH, metadata.json last. Only process 0 writes
    anything but the arrays."""
    marker, writing = storage.join(path, MODEL_MARKER), storage.join(path, WRITING_MARKER)
    complete = storage.isfile(marker)
    if storage.exists(path) and not overwrite and (complete or not storage.isfile(writing)):
        raise CheckpointError(f"{path} exists; choose another path or pass overwrite=True")
    target = path + ".partial" if complete else path
    if jax.process_index() == 0:
        if storage.isfile(storage.join(target, MODEL_MARKER)):
            raise CheckpointError(
                f"{target} holds a complete model (left by an interrupted replacement of "
                f"{path}); move it away or remove it, then save again")
        storage.rmtree(target, ignore_errors=True)  # an interrupted save: never complete
        storage.write_text(storage.join(target, WRITING_MARKER), "an emo_jax model is being "
                           "written here; without metadata.json it is incomplete\n")
    parallel.barrier("emo_jax_save_model_start")
    params = str_keys(params)
    sums = checksums.tree_checksums(params, "params")  # every process (a collective)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(target, "params"), params, save_args=param_save_args(params))
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        _write_model_files(target, config, metadata, sums, finish=finish or target != path)
        if finish or target != path:
            storage.remove(storage.join(target, WRITING_MARKER))
        if target != path:  # the new one is complete: now replace the old one
            storage.write_text(writing, "being replaced\n")
            storage.remove(marker)
            for name in storage.listdir(path):
                if name != WRITING_MARKER:
                    storage.rmtree(storage.join(path, name))
            storage.copytree(target, path, last=MODEL_MARKER)
            storage.remove(writing)
            storage.rmtree(target)
    parallel.barrier("emo_jax_save_model_end")
    return path
