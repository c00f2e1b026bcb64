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

from emo_jax import storage
from emo_jax.config import ConfigError
from emo_jax.data import tokenizers
from emo_jax.interop import hf as hf_lib
from emo_jax.interop import safetensors_io
from emo_jax.interop.hf import InteropError
from emo_jax.model_files import save_model
from emo_jax.modular.runtime import load_model

TOKENIZER_FILES = tokenizers.HF_TOKENIZER_FILES  # a HF tokenizer: tokenizer.json and companions
TOKENIZER_SUBDIR = tokenizers.TOKENIZER_DIR
SENTENCEPIECE_FILE = "tokenizer.model"  # a SentencePiece model in a Hugging Face folder

def _refuse_existing(path: str):
    if storage.exists(path) if storage.is_remote(path) else os.path.lexists(path):
        raise InteropError(f"{path} already exists; choose a new output directory (nothing is "
                           "overwritten)")


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yields a path (not yet created) to build the output in; renamed to `final` on success.

    The work path is a hidden sibling of `final` (same file system, so the rename is atomic);
    on any failure it is removed, with the `.partial` that save_model may leave.

    On object storage (no rename) the work path is a local temporary one, uploaded into `final`
    on success with its metadata.json (an emo_jax model's completion mark) last.
    """
    if storage.is_remote(final):
        final = storage.absolute(final)
        _refuse_existing(final)
        with tempfile.TemporaryDirectory(prefix="emo_jax_convert_") as parent:
            work = os.path.join(parent, "out")
            yield work
            storage.upload_tree(work, final, last="metadata.json")
        return
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
    hf_dir, out = os.path.abspath(hf_dir), storage.absolute(out)
    _refuse_existing(out)  # before the (possibly long) conversion; atomic_dir checks again
    hf = read_hf_config(hf_dir)
    config, notes = hf_lib.config_from_hf(hf, name=os.path.join(hf_dir, "config.json"))
    reader = safetensors_io.SafetensorsReader(hf_dir)
    reader.check(hf_lib.hf_shapes(config))
    # save_model copies the tokenizer's files into out/tokenizer/ (tokenizers.bundle_spec)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        config.data.tokenizer = "hf:" + os.path.join(hf_dir, "tokenizer.json")
    elif os.path.isfile(os.path.join(hf_dir, SENTENCEPIECE_FILE)):
        config.data.tokenizer = "sentencepiece:" + os.path.join(hf_dir, SENTENCEPIECE_FILE)
    elif config.data.tokenizer != "byte":
        notes.append(f"no tokenizer.json or {SENTENCEPIECE_FILE} in {hf_dir}; data.tokenizer "
                     f"stays {config.data.tokenizer!r}")
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
        # the special token ids the model was served with, written back on export
        "token_ids": hf_lib.token_ids_from_hf(hf),
        "notes": notes,
    }
    with atomic_dir(out) as work:
        save_model(work, model, config, metadata)
        extra = os.path.join(hf_dir, SENTENCEPIECE_FILE)  # both kinds present: keep both
        if config.data.tokenizer.startswith("hf:") and os.path.isfile(extra):
            shutil.copyfile(extra, os.path.join(work, TOKENIZER_SUBDIR, SENTENCEPIECE_FILE))
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


def _tokenizer_sources(spec: str) -> list[tuple[str, str]]:
    """[(file, name in the Hugging Face folder)] of the tokenizer a spec names: tokenizer.json
    and its companions, or a SentencePiece model as tokenizer.model (Hugging Face's name)."""
    files = tokenizers.spec_files(spec)
    if spec.startswith("sentencepiece:"):
        return [(path, SENTENCEPIECE_FILE) for path in files]
    folder = os.path.dirname(files[0]) if files else ""
    extra = os.path.join(folder, SENTENCEPIECE_FILE)
    return ([(path, os.path.basename(path)) for path in files]
            + ([(extra, SENTENCEPIECE_FILE)] if files and os.path.isfile(extra) else []))


def export_token_ids(config, metadata: dict, overrides: dict | None = None) -> dict:
    """{pad/eos/bos_token_id} an export writes: `overrides` (not None) first, then the ids an
    imported model came with (metadata `token_ids`), then those of its tokenizer
    (`data.tokenizer`). InteropError when the tokenizer is needed and cannot be read."""
    ids = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = metadata.get("token_ids") or {}
    ids.update({k: stored[k] for k in hf_lib.TOKEN_ID_KEYS if k not in ids and k in stored})
    if all(k in ids for k in hf_lib.TOKEN_ID_KEYS):
        return ids
    try:
        tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    except ConfigError as err:
        raise InteropError(f"the special token ids come from the model's tokenizer, which "
                           f"cannot be read ({err}); pass --pad_token_id and --eos_token_id "
                           "(and --bos_token_id) instead") from None
    found = tokenizers.special_token_ids(tokenizer)
    return {k: ids.get(k, found[k]) for k in hf_lib.TOKEN_ID_KEYS}


def export_hf(checkpoint: str, out: str, *, step: int | None = None, dtype: str = "float32",
              max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES,
              token_ids: dict | None = None, remote_code: str | None = None) -> str:
    """Writes a checkpoint as a Hugging Face EMO folder; returns its path.

    token_ids: {pad/eos/bos_token_id: id} overriding those found (`export_token_ids`).
    remote_code: 'local' or 'ORG/REPO' writes an `auto_map` to the reference's remote code
    (`hf.remote_code_map`), so `from_pretrained(..., trust_remote_code=True)` finds it.
    """
    out = storage.absolute(out)
    _refuse_existing(out)  # before the (possibly long) restore; atomic_dir checks again
    if remote_code:
        hf_lib.remote_code_map(remote_code)  # a bad value fails before the restore
    model, config, metadata = load_model(checkpoint, step=step)  # on one device
    hf = hf_lib.config_to_hf(config, dtype=dtype, subset=_is_subset(metadata),
                             lineage=_lineage(metadata),
                             token_ids=export_token_ids(config, metadata, token_ids),
                             remote_code=remote_code)
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
        for path, name in tokenizer:
            shutil.copyfile(path, os.path.join(work, name))
    print(f"wrote {out}: config.json, {', '.join(files)}"
          + (f", {', '.join(name for _, name in tokenizer)}" if tokenizer else ""))
    if remote_code == "local":
        print(f"note: copy configuration_emo.py and modeling_emo.py (allenai/EMO, "
              f"src/hf_trust_remote_code/emo/) into {out} to load it with "
              "trust_remote_code=True")
    return out
