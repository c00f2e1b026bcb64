"""Installs emo_jax: a JAX/Flax NNX framework for EMO-style modular mixture-of-experts LMs."""

from setuptools import find_packages, setup

setup(
    name="emo_jax",
    version="0.1.0",
    description=(
        "Pretrain EMO-style modular mixture-of-experts language models with JAX/Flax NNX, "
        "then select, extract and serve expert subsets."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["emo_jax", "emo_jax.*"]),
    package_data={"emo_jax": ["data/corpus/*", "data/corpus/**/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.8,<0.13",
        "flax>=0.12,<0.14",
        "optax>=0.2.5,<0.4",
        "orbax-checkpoint>=0.11.20,<0.14",
        # the one path library (emo_jax/storage.py; Orbax's own): local paths, and gs:// or
        # s3:// through fsspec with the `gcs` extra
        "etils[epath]>=1.7",
        "grain>=0.2.12,<0.4",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.7",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "psutil>=5.9",
    ],
    extras_require={
        # gs:// workdirs, models and data (emo_jax/storage.py through etils.epath + fsspec;
        # google-cloud-storage comes with it, for TensorBoard events on gs://)
        "gcs": ["gcsfs>=2024.2"],
        # the cloud-storage tests start a local GCS emulator (tests/gcs_helpers.py)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gcsfs>=2024.2",
                 "gcp-storage-emulator>=2026.7.18"],
        "hf": ["tokenizers>=0.15"],
        # lm-evaluation-harness for `emo-lm-eval` / `python -m emo_jax.lm_eval` (not in CI).
        "lm_eval": ["lm-eval>=0.4,<0.5"],
        # libtpu for `emo-plan --topology=...` (TPU compile on any host): jax's own tpu extra
        # pins the libtpu that matches the installed jax (jax 0.10.2 -> libtpu 0.0.42.*).
        "tpu": ["jax[tpu]>=0.8,<0.13"],
    },
    entry_points={
        "console_scripts": [
            "emo-train=emo_jax.train.__main__:run",
            "emo-eval=emo_jax.eval:run",
            "emo-summary=emo_jax.summary:run",
            "emo-plan=emo_jax.plan:run",
            "emo-select=emo_jax.select:run",
            "emo-extract=emo_jax.extract:run",
            "emo-analyze=emo_jax.analyze:run",
            "emo-generate=emo_jax.generate:run",
            "emo-convert=emo_jax.convert:run",
            "emo-compose=emo_jax.compose:run",
            "emo-lm-eval=emo_jax.lm_eval:run",
        ]
    },
)
