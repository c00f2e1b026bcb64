"""A local Google Cloud Storage emulator for the tests (gcp-storage-emulator, in a subprocess on
127.0.0.1 at a free port): gcsfs (etils.epath, google-cloud-storage) and TensorStore (Orbax)
reach it through STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL; the subprocesses the
tests start inherit both."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time

BUCKET = "emo-test"


def emulator_command() -> list[str] | None:
    """How to start the emulator (through gcs_emulator_server.py, which adds what TensorStore
    needs), or None when it is not installed."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        return None
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "gcs_emulator_server.py")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator(str):
    """The bucket's URL (gs://BUCKET), with `bytes_served()`: object bytes downloaded so far."""

    stats: str

    def bytes_served(self) -> int:
        try:
            with open(self.stats, encoding="ascii") as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0


@contextlib.contextmanager
def gcs_emulator(stats_file: str, bucket: str = BUCKET):
    """Starts the emulator (in memory, with `bucket`), points this process's environment at it
    and yields an `Emulator` (the bucket's URL, gs://BUCKET); stops it and restores the
    environment after. `stats_file`: where the emulator counts the bytes it serves."""
    command = emulator_command()
    if command is None:
        raise RuntimeError("gcp-storage-emulator is not installed (pip install "
                           "gcp-storage-emulator, or emo_jax[test])")
    port = _free_port()
    proc = subprocess.Popen(command + ["start", "--host=127.0.0.1", f"--port={port}",
                                       "--in-memory", f"--default-bucket={bucket}", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, EMO_GCS_EMULATOR_STATS=stats_file))
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GOOGLE_CLOUD_PROJECT")}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.05)
        os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                          GOOGLE_CLOUD_PROJECT="emo-test")
        emulator = Emulator(f"gs://{bucket}")
        emulator.stats = stats_file
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
