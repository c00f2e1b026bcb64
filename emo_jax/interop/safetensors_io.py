"""Sharded safetensors files as Hugging Face writes them, with strict completeness checks.

Writing: one `model.safetensors`, or, when the tensors exceed `max_shard_bytes`,
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` (`weight_map`:
tensor -> file, `metadata.total_size`). Tensors are produced on demand, one shard at a time, so a
writer never holds more than one shard beyond the model itself.

Reading: headers are read first (a truncated or corrupt file fails here), then `check` compares
the names, shapes and dtypes with what the config needs. Every failure is one InteropError naming
the file or tensor. Tensors load lazily through the Mapping interface. Nothing is unpickled:
safetensors holds raw arrays only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from emo_jax.interop.hf import InteropError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"
_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16,
                 "F64": np.float64}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """Bytes of '5GB', '500MB', '2GiB' or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise InteropError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or a number "
                           "of bytes")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise InteropError(f"shard size {text!r} must be > 0")
    return size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names of at most max_shard_bytes (a larger tensor: alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_safetensors(out_dir, shapes: Mapping[str, tuple], get: Callable[[str], np.ndarray],
                      dtype, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None) -> list[str]:
    """Writes the tensors named in `shapes` (`get(name)` makes each, cast to `dtype`).

    Returns the file names written (relative to out_dir).
    """
    out_dir = Path(out_dir)
    dtype = np.dtype(dtype)
    sizes = {name: int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
             for name, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    for file_name, shard in zip(names, shards):
        arrays = {}
        for name in shard:
            array = np.ascontiguousarray(np.asarray(get(name)).astype(dtype))
            if tuple(array.shape) != tuple(shapes[name]):
                raise InteropError(f"tensor {name} has shape {array.shape}, expected "
                                   f"{tuple(shapes[name])}")
            arrays[name] = array
            weight_map[name] = file_name
        save_file(arrays, str(out_dir / file_name), metadata=meta)
        os.chmod(out_dir / file_name, 0o666 & ~_umask())  # safetensors writes 0600
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_FILE]
    return names


class SafetensorsReader(Mapping):
    """The tensors of a Hugging Face model folder: names, shapes and dtypes from the headers,
    arrays loaded on access."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        index_path, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise InteropError(f"{index_path} is not a safetensors index with a weight_map "
                                   f"({err})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise InteropError(f"{self.dir} holds no {SINGLE_FILE} and no {INDEX_FILE}")
        self.files = files
        self.location: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file_name in files:
            path = self.dir / file_name
            if not path.is_file():
                raise InteropError(f"{path} is missing (listed in {INDEX_FILE})")
            try:
                with safe_open(str(path), framework="numpy") as f:
                    for name in f.keys():
                        view = f.get_slice(name)
                        self.location[name] = file_name
                        self.shapes[name] = tuple(view.get_shape())
                        self.dtypes[name] = view.get_dtype()
            except (SafetensorError, OSError) as err:
                raise InteropError(f"{path} is not a readable safetensors file (truncated or "
                                   f"corrupt?): {err}") from None
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if self.location.get(name) != file_name:
                    raise InteropError(f"tensor {name} is listed in {INDEX_FILE} under "
                                       f"{file_name} but that file does not hold it")

    def check(self, expected: Mapping[str, tuple]) -> None:
        """Refuses missing, unexpected, misshapen or non-float tensors (one named error)."""
        for name, shape in expected.items():
            if name not in self.shapes:
                raise InteropError(f"tensor {name} (shape {tuple(shape)}) is missing from "
                                   f"{self.dir}")
            if self.shapes[name] != tuple(shape):
                raise InteropError(f"tensor {name} in {self.dir / self.location[name]} has shape "
                                   f"{self.shapes[name]}, the config needs {tuple(shape)}")
            if self.dtypes[name] not in _FLOAT_DTYPES:
                raise InteropError(f"tensor {name} in {self.dir / self.location[name]} has dtype "
                                   f"{self.dtypes[name]}; expected one of "
                                   f"{', '.join(_FLOAT_DTYPES)}")
        extra = sorted(set(self.shapes) - set(expected))
        if extra:
            raise InteropError(f"{self.dir} holds tensors the config does not describe (another "
                               f"architecture?): {', '.join(extra[:5])}"
                               f"{' ...' if len(extra) > 5 else ''}")

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.dir / self.location[name]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise InteropError(f"cannot read tensor {name} from {path}: {err}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def file_sizes(self) -> dict[str, int]:
        return {f: os.path.getsize(self.dir / f) for f in self.files}
