"""The standard-MoE baseline of the reference recipe: `configs/emo_1b14b.py` with the document
pool switched off (`moe.pool='none'`: every token routes over all 127 routed experts). Every
other key is identical, so the two runs are comparable (docs/METHOD.md §3.5).

    python -m emo_jax.train --config=configs/stdmoe_1b14b.py --workdir=/shared/stdmoe_1b14b \\
        --config.data.train_sources=PATH_OR_SPEC \\
        --config.data.tokenizer=hf:PATH/TO/dolma2-tokenizer/tokenizer.json
"""

import importlib.util
import os


def _emo_1b14b():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emo_1b14b.py")
    spec = importlib.util.spec_from_file_location("emo_1b14b_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    c = _emo_1b14b().get_config(arg)
    c.moe.pool = "none"
    return c
