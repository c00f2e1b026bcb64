"""Conversion between emo_jax checkpoints and Hugging Face EMO folders, as library functions.

`import_hf(hf_dir, out)` writes an emo_jax model directory from an HF folder; `export_hf(checkpoint,
out)` writes an HF folder from any checkpoint `restore_model` reads. Both write atomically
(`atomic_dir`). The command line is `python -m emo_jax.convert` (emo_jax/convert.py); the tensor
and config mappings are in `emo_jax.interop.hf`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

from emo_jax.interop import hf as hf_lib
from emo_jax.interop import safetensors_io
from emo_jax.interop.hf import InteropError
from emo_jax.model_files import save_model
from emo_jax.modular.runtime import load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_SUBDIR = "tokenizer"

def _refuse_existing(path: str):
    if os.path.lexists(path):
        raise InteropError(f"{path} already exists; choose a new output directory (nothing is "
                           "overwritten)")


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yields a path (not yet created) to build the output in; renamed to `final` on success.

    The work path is a hidden sibling of `final` (same file system, so the rename is atomic);
    on any failure it is removed, with the `.partial` that save_model may leave.
    """
    final = os.path.abspath(final)
    _refuse_existing(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.converting-", dir=parent)
    os.rmdir(work)  # save_model creates its own directory; the unique name is what we keep
    try:
        yield work
        os.rename(work, final)
    except BaseException:
        for path in (work, work + ".partial"):
            shutil.rmtree(path, ignore_errors=True)
        raise


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_hf_config(hf_dir: str) -> dict:
    """The config.json of a Hugging Face model folder, or InteropError naming what is wrong."""
    if not os.path.isdir(hf_dir):
        raise InteropError(f"{hf_dir} is not a directory (expected a Hugging Face model folder)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise InteropError(f"{path} is missing: a Hugging Face model folder needs config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise InteropError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{path} is not a JSON object")
    return hf


def import_hf(hf_dir: str, out: str) -> str:
    """Converts a Hugging Face EMO folder into an emo_jax model directory; returns its path."""
    hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
    _refuse_existing(out)  # before the (possibly long) conversion; atomic_dir checks again
    hf = read_hf_config(hf_dir)
    config, notes = hf_lib.config_from_hf(hf, name=os.path.join(hf_dir, "config.json"))
    reader = safetensors_io.SafetensorsReader(hf_dir)
    reader.check(hf_lib.hf_shapes(config))
    tokenizer_files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]
    if "tokenizer.json" in tokenizer_files:
        config.data.tokenizer = "hf:" + os.path.join(out, TOKENIZER_SUBDIR, "tokenizer.json")
    elif config.data.tokenizer.startswith("hf:"):
        notes.append(f"no tokenizer.json in {hf_dir}; data.tokenizer stays "
                     f"{config.data.tokenizer!r}")
    params, param_notes = hf_lib.params_from_hf(reader, config)
    notes += param_notes
    model = hf_lib.model_from_params(config, params, consume=True)
    metadata = {
        "source": {
            "format": "huggingface",
            "path": hf_dir,
            "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"),
            "config_sha256": _sha256(os.path.join(hf_dir, "config.json")),
            "weight_files": reader.file_sizes(),
            "dtypes": sorted(set(reader.dtypes.values())),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "lineage": (hf.get(hf_lib.EXTRA_KEY) or {}).get("lineage"),
        },
        "hf_config": hf_lib.hf_config_copy(hf),
        "notes": notes,
    }
    with atomic_dir(out) as work:
        save_model(work, model, config, metadata)
        if tokenizer_files:
            os.makedirs(os.path.join(work, TOKENIZER_SUBDIR))
            for name in tokenizer_files:
                shutil.copyfile(os.path.join(hf_dir, name),
                                os.path.join(work, TOKENIZER_SUBDIR, name))
    for note in notes:
        print(f"note: {note}")
    return out


def _lineage(metadata: dict) -> dict:
    """What an exported config.json records about the checkpoint it came from (JSON-able)."""
    skip = {"summary", "hf_config", "format", "format_version"}
    return json.loads(json.dumps({k: v for k, v in metadata.items() if k not in skip},
                                 default=str))


def _is_subset(metadata: dict) -> bool:
    """Whether the checkpoint is an extracted expert subset (written by emo_jax.extract, or
    imported from a pruned Hugging Face model)."""
    return (any(key in metadata for key in ("subset", "extracted_from", "extract"))
            or "num_experts_per_layer" in (metadata.get("hf_config") or {}))


def _tokenizer_sources(spec: str) -> list[str]:
    if not spec.startswith("hf:"):
        return []
    path = os.path.expanduser(spec[3:])
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    primary = os.path.join(folder, "tokenizer.json") if os.path.isdir(path) else path
    found = [primary] if os.path.isfile(primary) else []
    return found + [os.path.join(folder, f) for f in TOKENIZER_FILES[1:]
                    if os.path.isfile(os.path.join(folder, f))]


def export_hf(checkpoint: str, out: str, *, step: int | None = None, dtype: str = "float32",
              max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes a checkpoint as a Hugging Face EMO folder; returns its path."""
    out = os.path.abspath(out)
    _refuse_existing(out)  # before the (possibly long) restore; atomic_dir checks again
    model, config, metadata = load_model(checkpoint, step=step)  # on one device
    hf = hf_lib.config_to_hf(config, dtype=dtype, subset=_is_subset(metadata),
                             lineage=_lineage(metadata))
    tensors = hf_lib.export_tensors(hf_lib.model_params(model, host=False), config)
    with atomic_dir(out) as work:
        os.makedirs(work)
        with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
            f.write("\n")
        files = safetensors_io.write_safetensors(
            work, hf_lib.hf_shapes(config), lambda name: tensors[name](), hf_lib.DTYPES[dtype],
            max_shard_bytes=max_shard_bytes)
        tokenizer = _tokenizer_sources(config.data.tokenizer)
        for path in tokenizer:
            shutil.copyfile(path, os.path.join(work, os.path.basename(path)))
    print(f"wrote {out}: config.json, {', '.join(files)}"
          + (f", {', '.join(os.path.basename(p) for p in tokenizer)}" if tokenizer else ""))
    return out
