"""Lazy extraction (emo_jax/modular/lazy.py): reading only the kept experts' rows from disk gives
bit for bit the eager extraction, and its peak memory stays far below the expert tensors'
size, measured in subprocesses against the eager path on a checkpoint with ~200 MB of experts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from emo_jax.modular import lazy, subset as subset_lib
from emo_jax.model_files import save_model

from modular_helpers import random_model, tiny_config

# Runs one extraction in a fresh process; prints RSS before it (after every import) and the
# peak after it, in bytes.
MEASURE = """
import json, sys, psutil
from emo_jax.modular import extract, lazy, runtime, subset as subset_lib
from emo_jax.model_files import save_model
mode, checkpoint, subset_path, out = sys.argv[1:]
subset = subset_lib.load(subset_path)
before = psutil.Process().memory_info().rss
if mode == "lazy":
    lazy.extract_lazy(checkpoint, subset, out)
else:
    model, config, _ = runtime.load_model(checkpoint)
    small, small_config, _ = extract.extract(model, config, subset)
    save_model(out, small, small_config)
print(json.dumps({"before": before, "peak": lazy.peak_rss_bytes()}))
"""


def big_config():
    """4 layers of 32 routed experts of 3 x 256 x 512 float32: 192 MiB of expert tensors."""
    c = tiny_config(num_experts=33, num_shared_experts=1, expert_hidden=512)
    c.model.d_model, c.model.num_layers = 256, 4
    return c


def expert_bytes(config) -> int:
    m, e = config.model, config.moe
    return 4 * m.num_layers * (e.num_experts - e.num_shared_experts) * 3 * m.d_model * \
        e.expert_hidden


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy_big")
    config = big_config()
    model = random_model(big_config(), 0)
    path = save_model(str(d / "full"), model, config)
    # Keep 4 of 32 routed experts per layer (12.5%), different ones in each layer.
    rng = np.random.default_rng(0)
    layers = [sorted(rng.choice(32, 4, replace=False).tolist()) for _ in range(4)]
    subset = subset_lib.make_subset(layers, config=config, model=model, method="manual", data={})
    subset_path = subset_lib.save(subset, str(d / "subset.json"))
    del model
    yield {"dir": d, "checkpoint": path, "subset": subset_path, "config": config}
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_lazy_equals_eager_bit_for_bit_in_a_fraction_of_the_memory(big_checkpoint):
    c = big_checkpoint
    procs = {mode: subprocess.Popen(
        [sys.executable, "-c", MEASURE, mode, c["checkpoint"], c["subset"], str(c["dir"] / mode)],
        cwd=th.REPO, env=th.cli_env(devices=1), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE) for mode in ("lazy", "eager")}
    used = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        rss = json.loads(out.strip().splitlines()[-1])
        used[mode] = rss["peak"] - rss["before"]
    experts = expert_bytes(c["config"])
    lazy_reader = lazy.ParamsReader(str(c["dir"] / "lazy"))
    eager_reader = lazy.ParamsReader(str(c["dir"] / "eager"))
    output = lazy_reader.total_bytes()
    print(f"experts {experts / 2**20:.0f} MiB, output {output / 2**20:.1f} MiB; peak above the "
          f"imports: lazy {used['lazy'] / 2**20:.0f} MiB, eager {used['eager'] / 2**20:.0f} MiB")
    # The measurement sees a full load (the eager path holds every expert tensor at least once)
    assert used["eager"] > experts
    # ... and the lazy path holds about the output plus a small constant.
    assert used["lazy"] < 0.35 * experts
    assert used["lazy"] < output + 48 * 2**20
    # Bit for bit the eager result.
    assert lazy_reader.names == eager_reader.names
    for name in lazy_reader.names:
        a, b = lazy_reader.read(name), eager_reader.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), name
    assert json.loads(lazy_reader.config.to_json()) == json.loads(eager_reader.config.to_json())
    # Single experts are stored one per chunk, so they are what a read decodes.
    assert lazy.ParamsReader(c["checkpoint"]).chunk_shape("blocks/moe/w_up") == (1, 1, 256, 512)


def test_reads_and_reports_of_a_small_checkpoint(tmp_path, monkeypatch):
    """Slices read lazily equal the arrays; the report adds up; a checkpoint written with
    whole-array chunks (Orbax's default, older emo_jax) still extracts correctly. Blocks of 2
    experts (and of 16 embedding rows): several writes per layer and array."""
    import orbax.checkpoint as ocp

    monkeypatch.setattr(lazy, "BLOCK_BYTES", 2 * 32 * 32 * 4)

    config = tiny_config()
    model = random_model(config, 1)
    path = save_model(str(tmp_path / "m"), model, config)
    pure = nnx.to_pure_dict(nnx.state(model))
    reader = lazy.ParamsReader(path)
    w = np.asarray(pure["blocks"]["moe"]["w_down"])
    np.testing.assert_array_equal(reader.read("blocks/moe/w_down", (1, [0, 5, 7])), w[1, [0, 5, 7]])
    router = np.asarray(pure["blocks"]["moe"]["router"])
    np.testing.assert_array_equal(reader.read("blocks/moe/router", (0, slice(None), [2, 3])),
                                  router[0][:, [2, 3]])
    subset = subset_lib.make_subset([[1, 2, 5], [0, 6, 7]], config=config, model=model,
                                    method="manual", data={})
    report = lazy.extract_lazy(path, subset, str(tmp_path / "small"))
    assert report["experts_per_chunk"] == 1
    import jax

    sizes = [np.asarray(x).size for x in jax.tree.leaves(pure)]
    assert report["params_before"] == sum(sizes)
    assert report["bytes_before"] == report["checkpoint_bytes"] == 4 * sum(sizes)
    small_reader = lazy.ParamsReader(str(tmp_path / "small"))
    assert report["bytes_after"] == small_reader.total_bytes()
    # Whole-array chunks: written as Orbax does by default.
    old = str(tmp_path / "old" / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(old, pure)
    checkpointer.wait_until_finished()
    shutil.copy(f"{path}/config.json", tmp_path / "old" / "config.json")
    shutil.copy(f"{path}/metadata.json", tmp_path / "old" / "metadata.json")
    report_old = lazy.extract_lazy(str(tmp_path / "old"), subset, str(tmp_path / "small_old"))
    assert report_old["experts_per_chunk"] == 8
    new, old_small = lazy.ParamsReader(str(tmp_path / "small")), lazy.ParamsReader(
        str(tmp_path / "small_old"))
    for name in new.names:
        np.testing.assert_array_equal(new.read(name), old_small.read(name))
    small = new.read("blocks/moe/w_gate")
    full = np.asarray(pure["blocks"]["moe"]["w_gate"])
    np.testing.assert_array_equal(small[1], full[1, [0, 6, 7]])
    # Orbax restores the streamed directory; it is the eager extraction.
    from emo_jax.modular import extract
    from emo_jax.modular.runtime import load_model

    restored, restored_config, metadata = load_model(str(tmp_path / "small"))
    eager, eager_config, _ = extract.extract(model, config, subset)
    assert json.loads(restored_config.to_json()) == json.loads(eager_config.to_json())
    assert metadata["extract"]["lazy"] and metadata["subset"]["layers"] == subset.layers
    for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(eager))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lazy_extraction_keeps_two_shared_experts_and_their_router(tmp_path):
    """Two shared experts: lazy extraction copies them and their own router whole, and gives
    bit for bit the eager extraction."""
    from emo_jax.modular import extract
    from emo_jax.model_files import restore_model

    config = tiny_config(num_shared_experts=2)
    model = random_model(config, 3)
    path = save_model(str(tmp_path / "m"), model, config)
    subset = subset_lib.make_subset([[1, 2, 5], [0, 4, 6]], config=config, model=model,
                                    method="manual", data={})
    lazy.extract_lazy(path, subset, str(tmp_path / "small"))
    small, small_config, _ = restore_model(str(tmp_path / "small"))
    eager, eager_config, _ = extract.extract(model, config, subset)
    assert small_config.to_dict() == eager_config.to_dict()
    got, want = (nnx.to_pure_dict(nnx.state(m)) for m in (small, eager))
    import jax

    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(got["blocks"]["moe"]["shared_router"],
                                  np.asarray(model.blocks.moe.shared_router[...]))
