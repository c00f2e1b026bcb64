"""Run lm-evaluation-harness tasks on a checkpoint or a subset of its experts (`emo-lm-eval`):

    python -m emo_jax.lm_eval --checkpoint=DIR [--subset=code.json] --tasks=TASK[,TASK...] \\
        [--include_path=DIR] [--num_fewshot=N] [--limit=N] [--batch_size=N] \\
        [--output_path=DIR] [any other option of `lm_eval run`]

--checkpoint is a training workdir, checkpoints/<step> directory or model directory (--step
picks a step of a workdir); --subset masks the model to a subset file's experts; --seq_len
overrides the context length (default: the run config's data.seq_len); --max_gen_toks is the
default generation length. Every other option goes to the harness's own command line
(`lm_eval run --model emo_jax --model_args checkpoint=DIR,...`), which prints the results
table; local tasks (YAML + JSONL) are found with --include_path. The model is the harness
model `emo_jax` of emo_jax/lm_eval_adapter.py; the harness finds it only when this module has
imported that one, so its plain `lm_eval` command does not know it.

Needs the optional extra: pip install -e '.[lm_eval]'.
"""

from __future__ import annotations

import argparse
import os
import sys

from emo_jax.cli import fail, quiet_logging

_OURS = ("checkpoint", "subset", "step", "seq_len", "max_gen_toks")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emo_jax.lm_eval", add_help=False,
                                allow_abbrev=False)
    p.add_argument("--checkpoint")
    p.add_argument("--subset")
    p.add_argument("--step", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--max_gen_toks", type=int)
    p.add_argument("--model")
    p.add_argument("--model_args")
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
    except SystemExit:
        fail("bad arguments; usage: python -m emo_jax.lm_eval --checkpoint=DIR "
             "[--subset=FILE] --tasks=... [harness options]")
    if args.help:
        print(__doc__ + "\nThe harness's options: lm_eval run --help")
        return
    from emo_jax import lm_eval_adapter as adapter

    if not adapter.harness_available():
        fail(adapter.INSTALL_HINT)
    if args.model and args.model != "emo_jax":
        fail(f"--model={args.model}: this command runs emo_jax models only (drop --model)")
    if not args.checkpoint:
        fail("give --checkpoint=DIR (a training workdir or model directory)")
    if not os.path.exists(args.checkpoint):
        fail(f"--checkpoint={args.checkpoint} does not exist")
    if args.subset and not os.path.isfile(args.subset):
        fail(f"--subset={args.subset} does not exist")
    for name in ("checkpoint", "subset"):
        value = getattr(args, name) or ""
        if "," in value or "=" in value:
            fail(f"--{name}={value}: the harness's model_args cannot carry ',' or '=' in a "
                 "path; rename or link it")
    if not any(a == "--tasks" or a.startswith("--tasks=") for a in rest):
        fail("give --tasks=TASK[,TASK...] (with --include_path=DIR for local task files)")
    quiet_logging()
    from emo_jax.config import ConfigError
    from emo_jax.model_files import CheckpointError
    from emo_jax.subset_file import SubsetError

    try:  # load now, so a bad checkpoint or subset is one line; the harness takes this one
        adapter.preload(args.checkpoint, subset=args.subset, step=args.step,
                        seq_len=args.seq_len)
    except (ConfigError, CheckpointError, SubsetError, FileNotFoundError, OSError,
            ValueError) as err:
        fail(str(err).splitlines()[0] if str(err) else repr(err))
    model_args = [f"{k}={getattr(args, k)}" for k in _OURS if getattr(args, k) is not None]
    if args.model_args:
        model_args.append(args.model_args)
    from lm_eval.__main__ import cli_evaluate

    if not any(a == "--batch_size" or a.startswith("--batch_size=") for a in rest):
        rest += ["--batch_size", str(adapter.DEFAULT_BATCH_SIZE)]  # the harness's default is 1
    sys.argv = ["lm-eval", "run", "--model", "emo_jax", "--model_args", ",".join(model_args),
                *rest]
    try:
        cli_evaluate()
    except ValueError as err:  # the harness's word on a user mistake, e.g. "Tasks not found"
        fail(str(err).splitlines()[0] if str(err) else repr(err))


def run():
    """Console-script entry point (`emo-lm-eval`)."""
    main()


if __name__ == "__main__":
    run()
