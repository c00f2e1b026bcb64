"""Reading and writing a checkpoint's arrays piece by piece, and lazy extraction built on it.

An emo_jax checkpoint's parameters are one Orbax PyTree item (`params/`): every array is a
zarr array (zarr v2 by default, v3 if Orbax wrote it so) stored in one OCDBT key-value database,
under the key of its tree path joined by '.' (`blocks.moe.w_gate`). `ParamsReader` opens those
arrays with TensorStore and reads index ranges of them, e.g. rows `[l, kept_ids]` of an expert
stack, so only the chunks holding those rows are fetched and decoded. emo_jax writes expert
stacks one expert per chunk (`model_files.param_save_args`); a checkpoint written with bigger
chunks still reads correctly, but every read decodes whole chunks (the report says so).

`write_params` writes a model directory array by array, block by block (a layer, or a few MiB
of rows), so no array is ever whole in memory: `save_params` first writes the directory with a
1-element placeholder per array (so Orbax writes every file it owns: tree metadata, manifest,
commit marker), then each placeholder is replaced in the same OCDBT database by the real zarr
array (Orbax's own zarr metadata, with the real shape and chunks), written block by block, and
the directory is renamed into place (atomic, as `save_model`). Orbax reads the result like any
checkpoint it wrote (tested: `restore_model` of extracted and composed models).

`extract_lazy(checkpoint, subset, out)` is `extract.extract` + `save_model` streamed: per
array and layer it reads only the kept rows (experts, router columns) or the layer itself
(attention, norms, shared experts) and writes it out. Arrays keep their stored dtype (a
bfloat16 checkpoint gives a bfloat16 model). Peak memory is one block plus TensorStore's and
Orbax's fixed costs, whatever the output's size. With a float32 checkpoint the result is bit
for bit the eager one (`extract.extract` of the restored model; tests/test_modular_lazy.py).

Nothing here builds a model or touches a device; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from typing import Callable, Iterable

import numpy as np
import tensorstore as ts
from absl import logging

from emo_jax import checksums, model_files, storage
from emo_jax.modular import subset as subset_lib
from emo_jax.modular.extract import extract_report, extracted_config

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # [L, R, ...]: routed expert axis 1
ROUTER = "router"  # [L, D, R]: routed expert axis 2
BLOCK_BYTES = 64 * 2**20  # rows of a non-layer array written (and chunked) at a time


model_files_sums = checksums.numpy_sums


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Linux: VmHWM of /proc/self/status (ru_maxrss survives execve, so a child started from a
    big process would report its parent's peak). Elsewhere: ru_maxrss (KiB on Linux and BSD,
    bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _context() -> ts.Context:
    """No cache for array chunks (each is read once); a bounded one for the OCDBT B-tree
    nodes, as Orbax itself uses."""
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


def _kvstore(params_dir: str, name: str, use_ocdbt: bool) -> dict:
    base = params_dir.rstrip("/") + "/"
    if "://" not in base:
        base = {"driver": "file", "path": base}
    if use_ocdbt:
        return {"driver": "ocdbt", "base": base, "path": name, "cache_pool": "cache_pool#ocdbt"}
    if isinstance(base, dict):
        return {"driver": "file", "path": base["path"] + name}
    return base + name


class ParamsReader:
    """The arrays of one checkpoint's params item, opened for partial reads.

    `path`: anything `restore_model` accepts (training workdir, checkpoints/<step>, model
    directory). Arrays are named by their '/'-joined tree path (`blocks/moe/w_gate`).
    """

    def __init__(self, path: str, step: int | None = None):
        self.params_dir, saved_config, self.metadata = model_files.locate_params(path, step)
        saved = self.metadata.pop("checksums", None) or {}
        self.checksums = (saved.get("arrays", {}) if saved.get("algorithm") == checksums.ALGORITHM
                          else {})
        self._partial = {}  # name -> (summed rows, sums) of a whole-array unit read in rows
        self.config = model_files.config_from_dict(saved_config)
        meta_path = storage.join(self.params_dir, "_METADATA")
        if not storage.isfile(meta_path):
            raise model_files.CheckpointError(f"{self.params_dir} has no Orbax _METADATA file; "
                                           "is it an emo_jax checkpoint?")
        meta = json.loads(storage.read_text(meta_path))
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self.names = sorted("/".join(k["key"] for k in entry["key_metadata"])
                            for entry in meta["tree_metadata"].values())
        self._context = _context()
        self._arrays = {}

    def array(self, name: str) -> ts.TensorStore:
        """The TensorStore of one array (opened once; reading it is what costs)."""
        if name not in self._arrays:
            if name not in self.names:
                raise model_files.CheckpointError(f"{self.params_dir} holds no array {name!r}")
            kvstore = _kvstore(self.params_dir, name.replace("/", "."), self.use_ocdbt)
            spec = {"driver": self.driver, "kvstore": kvstore, "recheck_cached_data": False,
                    "recheck_cached_metadata": False}
            self._arrays[name] = ts.open(spec, context=self._context, read=True).result()
        return self._arrays[name]

    def shape(self, name: str) -> tuple:
        return tuple(self.array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.array(name).dtype.numpy_dtype)

    def chunk_shape(self, name: str) -> tuple:
        return tuple(self.array(name).chunk_layout.read_chunk.shape)

    def read(self, name: str, index=()) -> np.ndarray:
        """`array[index]` as NumPy (outer indexing: a list picks those rows of its axis).

        Whole checksum units read (a layer, an expert of a layer, a whole array, also read as
        consecutive row blocks) are verified against the checkpoint's checksums
        (emo_jax/checksums.py): a mismatch raises CheckpointError naming the checkpoint.
        """
        values = np.asarray(self.array(name).oindex[index].read().result())
        self._verify(name, index if isinstance(index, tuple) else (index,), values)
        return values

    def _verify(self, name: str, index: tuple, values: np.ndarray):
        entry = self.checksums.get("params/" + name)
        shape = self.shape(name)
        if (entry is None or list(entry["shape"]) != list(shape)
                or entry["dtype"] != str(values.dtype)):
            return
        k = entry["unit_axes"]

        def whole(i, n):
            return isinstance(i, slice) and i.indices(n) == (0, n, 1)

        def ids(i, n):  # the positions an index picks on an axis of length n (None: unknown)
            if isinstance(i, (int, np.integer)):
                return [int(i)]
            if isinstance(i, slice):
                start, stop, stride = i.indices(n)
                return list(range(start, stop, stride))
            if isinstance(i, (list, np.ndarray)):
                return [int(v) for v in i]
            return None

        index = index + (slice(None),) * (len(shape) - len(index))
        if not all(whole(i, shape[a]) for a, i in enumerate(index) if a >= max(k, 1)):
            return  # part of a unit (e.g. some router columns): not verified here
        if k == 0:
            rows = ids(index[0], shape[0]) if shape else []
            if not shape or rows == list(range(shape[0])):
                self._compare(name, entry, [0], model_files_sums(values, 0))
            elif isinstance(index[0], slice) and rows and rows == list(range(rows[0],
                                                                              rows[-1] + 1)):
                per_row = int(np.prod(shape[1:], dtype=np.int64))
                done, total = self._partial.get(name, (set(), np.zeros((1, 2), np.uint32)))
                if not done & set(rows):
                    total = total + model_files_sums(values, 0, offset=rows[0] * per_row)
                    done = done | set(rows)
                    self._partial[name] = (done, total)
                    if len(done) == shape[0]:
                        del self._partial[name]
                        self._compare(name, entry, [0], total)
            return
        picked = [ids(index[a], shape[a]) for a in range(k)]
        if any(p is None for p in picked):
            return
        grid = np.ix_(*[np.asarray(p) for p in picked])
        units = np.ravel_multi_index(grid, shape[:k]).reshape(-1).tolist()
        block = values.reshape(tuple(len(p) for p in picked) + tuple(shape[k:]))
        self._compare(name, entry, units, model_files_sums(block, k))

    def _compare(self, name: str, entry: dict, units: list, sums):
        got = np.asarray(sums).reshape(-1, 2)
        for unit, (a, b) in zip(units, got):
            if checksums.unit_hex(entry, unit) != f"{int(a):08x}{int(b):08x}":
                where = self.metadata.get("path", self.params_dir)
                kind = "model directory" if self.metadata.get("kind") == "model" else "checkpoint"
                raise model_files.CheckpointError(
                    f"{kind} {where} is corrupt: "
                    + checksums.mismatch_message([("params/" + name, entry, unit)]))

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name))) * self.dtype(name).itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names)


def nest(flat: dict) -> dict:
    """{'a/b': x} -> {'a': {'b': x}}."""
    out = {}
    for name, value in flat.items():
        node = out
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------- writing


@dataclasses.dataclass
class ArrayPlan:
    """One array to write: its shape, dtype, chunk shape, and its blocks in any order
    (`blocks()` yields (index, values) pairs that together cover the array once)."""

    shape: tuple
    dtype: np.dtype
    chunks: tuple
    blocks: Callable[[], Iterable[tuple]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def chunks_for(name: str, shape: tuple, dtype) -> tuple:
    """The chunk shape emo_jax stores an array with (as `model_files.param_save_args`): one expert
    of one layer for expert stacks, one layer for the other block arrays, else rows of at most
    BLOCK_BYTES."""
    parts = name.split("/")
    if parts[0] == "blocks":
        if parts[-1] in model_files.EXPERT_STACKS:
            return (1, 1) + tuple(shape[2:])
        return (1,) + tuple(shape[1:])
    row = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    return (int(max(1, min(shape[0], BLOCK_BYTES // max(row, 1)))),) + tuple(shape[1:])


def layer_plan(name, shape, dtype, read: Callable[[int, int, int], np.ndarray]) -> ArrayPlan:
    """An [L, ...] array written a layer at a time from `read(layer, start, stop)`: the values
    of [layer, start:stop] (axis 1). An expert stack is written in groups of experts of at most
    BLOCK_BYTES (a whole layer of 127 experts of the 14B model is 0.5 GB per array); any other
    array a whole layer at a time (start, stop = 0, shape[1])."""
    chunks = chunks_for(name, shape, dtype)
    step = shape[1]
    if chunks[:2] == (1, 1) and len(shape) > 2:
        per_expert = int(np.prod(shape[2:])) * np.dtype(dtype).itemsize
        step = int(max(1, BLOCK_BYTES // max(per_expert, 1)))

    def blocks():
        for layer in range(shape[0]):
            for start in range(0, shape[1], step):
                stop = min(start + step, shape[1])
                yield (layer, slice(start, stop)), read(layer, start, stop)

    return ArrayPlan(tuple(shape), np.dtype(dtype), chunks, blocks)


def rows_plan(name, shape, dtype, read_rows: Callable[[slice], np.ndarray]) -> ArrayPlan:
    """An array written a chunk of rows (axis 0) at a time from `read_rows(slice)`."""
    chunks = chunks_for(name, shape, dtype)

    def blocks():
        for start in range(0, shape[0], chunks[0]):
            rows = slice(start, min(start + chunks[0], shape[0]))
            yield (rows,), read_rows(rows)

    return ArrayPlan(tuple(shape), np.dtype(dtype), chunks, blocks)


def copy_plan(reader: "ParamsReader", name: str) -> ArrayPlan:
    """An array copied unchanged from `reader`, block by block."""
    shape, dtype = reader.shape(name), reader.dtype(name)
    if name.startswith("blocks/"):
        return layer_plan(name, shape, dtype, lambda l, a, b: reader.read(name, (l, slice(a, b))))
    return rows_plan(name, shape, dtype, lambda rows: reader.read(name, (rows,)))


class _BlockSums:
    """The checksums entry of an array written block by block (layer_plan / rows_plan blocks:
    (layer, expert slice) or (row slice,)), the sums of a unit's blocks adding up."""

    def __init__(self, name: str, plan: ArrayPlan):
        self.shape = tuple(plan.shape)
        self.dtype = np.dtype(plan.dtype)
        self.k = checksums.unit_axes("params/" + name) if self.shape else 0
        self.k = min(self.k, len(self.shape))
        self.sums = np.zeros((int(np.prod(self.shape[:self.k], dtype=np.int64)), 2), np.uint32)

    def add(self, index: tuple, values: np.ndarray):
        per_row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        if self.k == 0:
            start = index[0].indices(self.shape[0])[0] if index and self.shape else 0
            self.sums += checksums.numpy_sums(values, 0, offset=start * per_row)
            return
        layer, part = index[0], index[1] if len(index) > 1 else slice(None)
        if self.k == 1:  # a layer (possibly in expert slices of it)
            start = part.indices(self.shape[1])[0]
            inner = int(np.prod(self.shape[2:], dtype=np.int64))
            self.sums[layer] += checksums.numpy_sums(values, 0, offset=start * inner)[0]
            return
        experts = range(*part.indices(self.shape[1]))
        got = checksums.numpy_sums(values, 1)
        for e, s in zip(experts, got):
            self.sums[layer * self.shape[1] + e] += s

    def entry(self) -> dict:
        return {"dtype": str(self.dtype), "shape": list(self.shape), "unit_axes": self.k,
                "sums": checksums.hexsums(self.sums)}


def write_params(path: str, plans: dict, config, metadata: dict | None = None) -> str:
    """Writes a model directory (as `save_model`) from {'/'-joined name: ArrayPlan}, streaming
    every array block by block (module docstring). An existing `path` is refused.

    On a disk it is written as PATH.staging and renamed into place; on object storage (no
    rename) in place, with metadata.json (the completion mark) written last."""
    remote = storage.is_remote(path)
    path = storage.absolute(path)
    if storage.isfile(storage.join(path, model_files.MODEL_MARKER)) or (
            not remote and os.path.exists(path)):
        raise model_files.CheckpointError(f"{path} exists; choose another path")
    staging = path if remote else path + ".staging"
    if not remote and os.path.exists(staging):
        shutil.rmtree(staging)  # an earlier interrupted write: never a complete model
    placeholders = {name: np.zeros((1,) * len(plan.shape), plan.dtype)
                    for name, plan in plans.items()}
    if remote:  # save_params refuses a PATH that exists and is not an interrupted save
        model_files.save_params(staging, nest(placeholders), config, metadata, finish=False)
    else:
        model_files.save_params(staging, nest(placeholders), config, metadata)
    params_dir = storage.join(staging, "params")
    if json.loads(storage.read_text(storage.join(params_dir, "_METADATA"))).get(
            "use_zarr3") or not storage.isfile(storage.join(params_dir, "manifest.ocdbt")):
        raise model_files.CheckpointError("streamed writes need Orbax's zarr v2 + OCDBT layout")
    context = _context()
    arrays = {}
    for name, plan in plans.items():
        kvstore = _kvstore(params_dir, name.replace("/", "."), True)
        spec = {"driver": "zarr", "kvstore": kvstore}
        placeholder = ts.open(spec, context=context, open=True).result()
        zarr_meta = dict(placeholder.spec().to_json()["metadata"])
        zarr_meta.update(shape=list(plan.shape), chunks=list(plan.chunks))
        array = ts.open(dict(spec, metadata=zarr_meta), context=context, create=True,
                        delete_existing=True).result()
        sums = _BlockSums(name, plan)
        for index, values in plan.blocks():
            values = np.asarray(values, plan.dtype)
            array[index].write(values).result()
            sums.add(index, values)
        arrays["params/" + name] = sums.entry()
    model_files.write_checksums(staging, arrays)  # replaces the placeholders' checksums
    if remote:
        model_files.finish_model(path)
    else:
        os.rename(staging, path)
    return path


# ---------------------------------------------------------------------------- extraction


def _router_digest(router_LDR: np.ndarray) -> str:
    router = np.ascontiguousarray(np.asarray(router_LDR, np.float32))
    return hashlib.sha256(router.tobytes()).hexdigest()[:16]


def _experts_per_chunk(reader: ParamsReader) -> int:
    """The most experts one stored chunk of an expert stack holds (1 = per-expert chunks)."""
    return max(reader.chunk_shape(f"blocks/moe/{w}")[1] for w in EXPERT_WEIGHTS)


def extract_plans(reader: ParamsReader, subset: subset_lib.Subset) -> dict:
    """{name: ArrayPlan} of the small model: the kept experts' rows and router columns (a layer
    keeping fewer than the largest padded with zeros, as `extract.extract`), every other array
    copied; each read when its block is written."""
    idx_LK, valid_LK = subset.padded_ids()
    plans = {}
    for name in reader.names:
        leaf = name.split("/")
        shape, dtype = reader.shape(name), reader.dtype(name)
        if leaf[:2] == ["blocks", "moe"] and leaf[-1] in EXPERT_WEIGHTS:
            def rows(l, a, b, name=name):
                values = reader.read(name, (l, idx_LK[l, a:b].tolist()))
                keep = valid_LK[l, a:b].reshape((-1,) + (1,) * (values.ndim - 1))
                return np.where(keep, values, np.zeros((), values.dtype))

            plans[name] = layer_plan(name, (shape[0], idx_LK.shape[1]) + shape[2:], dtype, rows)
        elif leaf[:2] == ["blocks", "moe"] and leaf[-1] == ROUTER:
            def columns(l, a, b, name=name):
                values = reader.read(name, (l, slice(a, b), idx_LK[l].tolist()))
                return np.where(valid_LK[l][None, :], values, np.zeros((), values.dtype))

            plans[name] = layer_plan(name, shape[:2] + (idx_LK.shape[1],), dtype, columns)
        else:
            plans[name] = copy_plan(reader, name)
    return plans


def extract_lazy(checkpoint: str, subset: subset_lib.Subset, out: str, *,
                 step: int | None = None, metadata: dict | None = None,
                 where: str = "the subset") -> dict:
    """Writes the subset's model to `out` (a model directory) reading only what it keeps.

    Returns the report of `extract.extract` plus: `lazy`, `bytes_read` (array bytes fetched),
    `checkpoint_bytes` (all arrays of the checkpoint), `experts_per_chunk` (of the input's
    stored chunks), `dtypes`, `seconds`, `peak_rss_bytes` (of this process, all it did).
    """
    start = time.perf_counter()
    reader = ParamsReader(checkpoint, step)
    config = reader.config
    subset.check_model(config, where=where)
    small_config = extracted_config(config, subset.keep_per_layer)
    digest = _router_digest(reader.read("blocks/moe/router"))
    if subset.model.get("router_digest") and subset.model["router_digest"] != digest:
        logging.warning("%s was chosen on a model with other router weights (digest %s, this "
                        "checkpoint %s): same shape, but maybe another checkpoint", where,
                        subset.model["router_digest"], digest)
    plans = extract_plans(reader, subset)
    bytes_after = sum(p.nbytes for p in plans.values())
    before = {"params": sum(int(np.prod(reader.shape(n))) for n in reader.names),
              "bytes": reader.total_bytes()}
    after = {"params": sum(int(np.prod(p.shape)) for p in plans.values()), "bytes": bytes_after}
    report = extract_report(config, small_config, subset, before, after)
    report.update({
        "lazy": True, "checkpoint_bytes": reader.total_bytes(),
        # the whole router is read once for the digest; the rest is what is kept
        "bytes_read": bytes_after + reader.nbytes("blocks/moe/router"),
        "experts_per_chunk": _experts_per_chunk(reader),
        "dtypes": sorted({str(p.dtype) for p in plans.values()}),
    })
    carried = {k: reader.metadata[k] for k in ("token_ids",) if k in reader.metadata}
    write_params(out, plans, small_config, metadata=dict(
        carried, **(metadata or {}), step=reader.metadata.get("step"),
        extracted_from=storage.absolute(checkpoint), subset=subset.to_json(), extract=report))
    report["seconds"] = time.perf_counter() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report
