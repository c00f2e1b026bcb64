"""Convert between emo_jax checkpoints and the Hugging Face EMO format (safetensors, no torch).

    python -m emo_jax.convert --from_hf=HF_DIR --out=MODEL_DIR
    python -m emo_jax.convert --checkpoint=WORKDIR_OR_MODEL_DIR --to_hf=HF_DIR \
        [--step=N] [--dtype=float32|bfloat16] [--max_shard_size=5GB] \
        [--remote_code=ORG/REPO|local] [--pad_token_id=N --eos_token_id=N --bos_token_id=N]

Import writes a standalone emo_jax model directory (`model_files.py: save_model`) that
train (`--init_checkpoint`), eval, select, extract and generate read like any other; its
metadata.json records the source (`source`: path, config.json hash, weight files, the Hugging
Face config), the special token ids it was served with (`token_ids`) and what the conversion
noticed (`notes`). A `tokenizer.json` (with `tokenizer_config.json`, `special_tokens_map.json`)
or a SentencePiece `tokenizer.model` beside the weights is copied into MODEL_DIR/tokenizer/ and
becomes `data.tokenizer` (relative to MODEL_DIR). A model whose layers have different numbers
of experts (the reference's `num_experts_per_layer`) becomes one with `moe.experts_per_layer`
(stacks zero-padded to the largest layer, the padding masked out of routing); export writes it
back the same way, each layer's experts and gate rows without the padding. Routing options of
the reference that emo_jax does not implement (`always_active_experts`, per-layer shared
counts, ...) are refused.

Export writes config.json with every key the reference's `EmoConfig` reads (the special token
ids: --*_token_id, else the imported model's, else the tokenizer's, each within the vocabulary;
with --remote_code an `auto_map`), the emo_jax config and lineage under the extra key `emo_jax`,
`model.safetensors` or shards with `model.safetensors.index.json`, and the tokenizer's files
(tokenizer.json and companions, or a SentencePiece model as tokenizer.model).

Both directions write the output directory atomically: everything goes to a hidden sibling
`.NAME.converting-*` that is renamed to NAME only when complete, and removed on failure. An
existing output directory is refused, never overwritten. The mappings themselves are in
`emo_jax/interop/hf.py`.
"""

from __future__ import annotations

from absl import app, flags

from emo_jax.cli import fail, parse_flags, quiet_logging
from emo_jax.config import ConfigError
from emo_jax.interop import hf as hf_lib
from emo_jax.interop import safetensors_io
from emo_jax.interop.conversion import export_hf, import_hf
from emo_jax.interop.hf import InteropError
from emo_jax.model_files import CheckpointError

_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face model folder to import.")
_OUT = flags.DEFINE_string("out", None, "emo_jax model directory to write (with --from_hf).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "emo_jax training workdir, checkpoints/<step> dir or model directory to "
    "export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Hugging Face folder to write (with --checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(hf_lib.DTYPES),
                           "Tensor dtype of the exported safetensors.")
_MAX_SHARD = flags.DEFINE_string(
    "max_shard_size", "5GB", "Largest safetensors file written; more tensors go to further "
    "shards listed in model.safetensors.index.json (e.g. 5GB, 500MB, bytes).")

_REMOTE_CODE = flags.DEFINE_string(
    "remote_code", None, "Export: write an auto_map to the reference's remote code "
    "(configuration_emo.EmoConfig, modeling_emo.EmoForCausalLM): ORG/REPO for a hub repository "
    "holding configuration_emo.py and modeling_emo.py, or 'local' for those files placed next "
    "to config.json.")
_PAD_ID = flags.DEFINE_integer("pad_token_id", None, "Export: pad_token_id to write (default: "
                               "the imported model's, else the tokenizer's).")
_EOS_ID = flags.DEFINE_integer("eos_token_id", None, "Export: eos_token_id to write (default: "
                               "the imported model's, else the tokenizer's).")
_BOS_ID = flags.DEFINE_integer("bos_token_id", None, "Export: bos_token_id to write (default: "
                               "the imported model's, else the tokenizer's).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    importing = _FROM_HF.value is not None or _OUT.value is not None
    exporting = _CHECKPOINT.value is not None or _TO_HF.value is not None
    if importing == exporting:
        fail("give either --from_hf=DIR --out=DIR (import) or --checkpoint=DIR --to_hf=DIR "
             "(export)")
    try:
        if importing:
            if not (_FROM_HF.value and _OUT.value):
                fail("import needs both --from_hf=DIR and --out=DIR")
            path = import_hf(_FROM_HF.value, _OUT.value)
            print(f"wrote {path}")
        else:
            if not (_CHECKPOINT.value and _TO_HF.value):
                fail("export needs both --checkpoint=DIR and --to_hf=DIR")
            export_hf(_CHECKPOINT.value, _TO_HF.value, step=_STEP.value, dtype=_DTYPE.value,
                      max_shard_bytes=safetensors_io.parse_size(_MAX_SHARD.value),
                      token_ids={"pad_token_id": _PAD_ID.value, "eos_token_id": _EOS_ID.value,
                                 "bos_token_id": _BOS_ID.value},
                      remote_code=_REMOTE_CODE.value)
    except (InteropError, CheckpointError, ConfigError, OSError) as err:
        fail(str(err))


def run():
    """Console-script entry point."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
