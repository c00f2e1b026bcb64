"""`python -m emo_jax.summary --config=configs/emo_1b14b.py`: a config's parameter counts and
training FLOPs per token, one `name=value` line each, without allocating the model.

Definitions of every figure: emo_jax/model/summary.py.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from emo_jax.config import ConfigError, validate
from emo_jax.model.summary import summarize
from emo_jax.model.model_config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)


def main(argv):
    del argv
    try:
        config = validate(_CONFIG.value)
    except ConfigError as err:
        raise app.UsageError(str(err))
    for name, value in summarize(ModelConfig.from_config(config), config.data.seq_len).items():
        print(f"{name}={value}")


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
