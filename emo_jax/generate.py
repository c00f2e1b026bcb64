"""Generate text from a checkpoint, optionally with only a subset of the experts (`emo-generate`):

    python -m emo_jax.generate --checkpoint=DIR --prompt="..." \\
        [--subset=subset.json | --subset_from_prompt=K [--method=layerwise]] \\
        [--max_new_tokens=128] [--temperature=0.7] [--top_p=0.9] [--seed=0] \\
        [--request_log=FILE.jsonl]

Decoding uses a fixed-size KV cache (emo_jax/model/decode.py). With --subset, or with
--subset_from_prompt=K (the subset is selected from the prompt itself, the serving mode the
method promises), the model is first cut down to those experts in memory
(emo_jax/modular/extract.py) and decodes with only them. --temperature=0 is greedy. The
generated text goes to stdout; what was kept goes to stderr. --request_log appends one JSON line
per request: how many routed assignments each expert of each layer made for it (in the
checkpoint's expert numbering; format in emo_jax/modular/request_log.py).
"""

from __future__ import annotations

import sys

from absl import app, flags

from emo_jax.cli import fail, parse_flags, quiet_logging
from emo_jax.config import ConfigError, routed_experts
from emo_jax.model.decode import generate
from emo_jax.model_files import CheckpointError
from emo_jax.modular import extract, request_log, runtime, select, subset as subset_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints/<step> "
                                  "directory or model directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_SUBSET = flags.DEFINE_string("subset", None, "Decode with only this subset's experts.")
_FROM_PROMPT = flags.DEFINE_integer("subset_from_prompt", None, "Select K experts per layer "
                                    "from the prompt and decode with only them.")
_METHOD = flags.DEFINE_enum("method", "layerwise", ["layerwise", "global", "easy_ep"],
                            "Selection method of --subset_from_prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling: keep the smallest set of tokens "
                            "whose probability reaches top_p (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_REQUEST_LOG = flags.DEFINE_string("request_log", None, "Append which experts of each layer "
                                   "served the request to this JSONL file.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    if _SUBSET.value and _FROM_PROMPT.value is not None:
        fail("give --subset or --subset_from_prompt, not both")
    if _MAX_NEW.value < 1:
        fail(f"--max_new_tokens={_MAX_NEW.value}: it must be >= 1")
    if _TEMPERATURE.value < 0 or not 0 < _TOP_P.value <= 1:
        fail("--temperature must be >= 0 and --top_p in (0, 1]")
    try:
        model, config, metadata = runtime.load_model(_CHECKPOINT.value)
        routed = routed_experts(config)
        tokenizer = runtime.tokenizer_of(config)
        prompt = runtime.prompt_ids(tokenizer, _PROMPT.value, config.data.boundary)
        if not prompt:
            fail("--prompt is empty: give text to continue")
        subset = None
        if _SUBSET.value:
            subset = subset_lib.load(_SUBSET.value)
        elif _FROM_PROMPT.value is not None:
            try:
                subset_lib.check_keep(_FROM_PROMPT.value, config)
            except ConfigError as err:  # its message names select's flag, --keep
                fail(str(err).replace("(--keep)", "(--subset_from_prompt)"))
            subset = select.select(model, [runtime.prompt_batch(prompt)], _FROM_PROMPT.value,
                                   _METHOD.value, data={"text": _PROMPT.value[:200]})
        if subset is not None:
            model, config, report = extract.extract(model, config, subset)
            kept = subset.keep_per_layer
            kept = kept[0] if len(set(kept)) == 1 else ",".join(map(str, kept))
            print(f"experts: {kept} of {report['num_experts_before']} per layer "
                  f"({subset.method}); {extract.format_report(report)}", file=sys.stderr)
        out, routing = generate(model, [prompt], max_new_tokens=_MAX_NEW.value,
                                temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                                seed=_SEED.value, eos_id=tokenizer.eos_id, return_routing=True)
        if _REQUEST_LOG.value:
            counts_LR = routing["counts_BLR"][0]
            if subset is not None:
                counts_LR = request_log.expand(counts_LR, subset.layers, routed)
            log = request_log.RequestLog(
                _REQUEST_LOG.value, tool="generate", checkpoint=_CHECKPOINT.value,
                shared_experts=config.moe.num_shared_experts, metadata=metadata,
                subset=_SUBSET.value or (f"from the prompt (K={_FROM_PROMPT.value}, "
                                         f"{_METHOD.value})" if subset is not None else None))
            log.write(counts_LR, int(routing["tokens_B"][0]), request=0,
                      prompt_tokens=len(prompt), prompt=_PROMPT.value[:200])
    except (ConfigError, CheckpointError, FileNotFoundError, OSError) as err:
        fail(str(err))
    ids = [int(t) for t in out[0]]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    print(_PROMPT.value + tokenizer.decode(ids))


def run():
    """Console-script entry point (`emo-generate`)."""
    flags.mark_flags_as_required(["checkpoint", "prompt"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
