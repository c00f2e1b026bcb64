"""Interop with other model formats: the Hugging Face EMO format (`hf.py`, pure mappings) and
sharded safetensors files (`safetensors_io.py`). The CLI is `emo_jax/convert.py`."""

from emo_jax.interop.hf import InteropError

__all__ = ["InteropError"]
