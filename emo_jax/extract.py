"""Write a standalone smaller model holding only a subset's experts (also `emo-extract`):

    python -m emo_jax.extract --checkpoint=DIR --subset=subset.json --out=DIR2

Keeps the subset's routed experts and router columns in every layer, and the shared experts;
the config becomes moe.num_experts = K, moe.top_k = min(top_k, K - shared). Prints the parameter
count and bytes before and after, the bytes read and the peak memory of the process.

By default the extraction is lazy (emo_jax/modular/lazy.py): only the kept experts' rows are
read from disk and the output is written layer by layer, so carving a subset out of a huge
checkpoint holds a few blocks of it in memory, never the model; arrays keep their stored dtype.
--eager restores the whole model (float32) and cuts it in memory (emo_jax/modular/extract.py):
the reference, equal bit for bit on a float32 checkpoint.

DIR2 is a model directory that every tool reads like any checkpoint: `emo_jax.eval`,
`emo_jax.generate`, `emo_jax.select` (with K no larger than the new expert count), and
`emo_jax.train --init_checkpoint=DIR2` to fine-tune it (the run adopts its expert count). An
existing DIR2 is never overwritten.
"""

from __future__ import annotations


from absl import app, flags

from emo_jax import storage
from emo_jax.cli import fail, parse_flags, quiet_logging
from emo_jax.config import ConfigError
from emo_jax.model_files import CheckpointError, save_model
from emo_jax.modular import extract, lazy, runtime, subset as subset_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints/<step> "
                                  "directory or model directory.")
_SUBSET = flags.DEFINE_string("subset", None, "Subset file (python -m emo_jax.select).")
_OUT = flags.DEFINE_string("out", None, "Model directory to write (must not exist).")
_EAGER = flags.DEFINE_bool("eager", False, "Restore the whole model and cut it in memory "
                           "(the reference) instead of reading only the kept experts.")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    try:
        if storage.exists(_OUT.value):
            raise CheckpointError(f"--out={_OUT.value} exists; choose a new directory")
        subset = subset_lib.load(_SUBSET.value)
        if _EAGER.value:
            model, config, metadata = runtime.load_model(_CHECKPOINT.value)
            subset.check_model(config, model, where=f"subset file '{_SUBSET.value}'")
            small, small_config, report = extract.extract(model, config, subset)
            path = save_model(_OUT.value, small, small_config, metadata={
                "step": metadata.get("step"),
                **({"token_ids": metadata["token_ids"]} if "token_ids" in metadata else {}),
                "extracted_from": storage.absolute(_CHECKPOINT.value),
                "subset": subset.to_json(),
                "extract": report,
            })
            report["peak_rss_bytes"] = lazy.peak_rss_bytes()
        else:
            report = lazy.extract_lazy(_CHECKPOINT.value, subset, _OUT.value,
                                       where=f"subset file '{_SUBSET.value}'")
            path = storage.absolute(_OUT.value)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    print(extract.format_report(report))
    if report.get("lazy"):
        print(f"read {report['bytes_read']:,} bytes ({_gib(report['bytes_read'])}) of "
              f"{report['checkpoint_bytes']:,} ({_gib(report['checkpoint_bytes'])}) in "
              f"{report['seconds']:.1f} s; stored chunks hold {report['experts_per_chunk']} "
              f"expert(s) of a layer")
        if report["experts_per_chunk"] > 1:
            print("note: this checkpoint stores several experts per chunk (written before "
                  "per-expert chunking); every read decoded whole chunks")
    print(f"peak memory (RSS) of this process: {report['peak_rss_bytes']:,} bytes "
          f"({_gib(report['peak_rss_bytes'])})")
    print(f"wrote {path}; fine-tune it with: python -m emo_jax.train --config=YOUR_CONFIG "
          f"--init_checkpoint={path} --workdir=DIR (the run adopts its "
          f"{report['num_experts_after']} experts and top_k {report['top_k_after']})")


def run():
    """Console-script entry point (`emo-extract`)."""
    flags.mark_flags_as_required(["checkpoint", "subset", "out"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
