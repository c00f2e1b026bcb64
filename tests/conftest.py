"""Test setup: 8 simulated CPU devices and fast compiles (train_helpers.FAST_COMPILE), set
before jax is imported anywhere."""

import os

from train_helpers import FAST_COMPILE

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (CI runs it; -m 'not slow' skips)")
