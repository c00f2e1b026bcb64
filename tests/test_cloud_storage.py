"""Workdirs, model directories and data on gs://, against a local GCS emulator the tests start
themselves (tests/gcs_helpers.py): training killed with SIGKILL, or stopped with SIGTERM, and
resumed on gs:// equals the local uninterrupted reference run; an unreadable newest checkpoint on gs:// is copied aside and
the run falls back exactly; model directories are complete only once metadata.json is written
(no rename on object storage), an interrupted save is never taken for a model; eval, extract
and convert take gs:// model directories; lazy extraction from gs:// fetches only a fraction
of the checkpoint's bytes, counted by the emulator."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th

pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install 'emo_jax[gcs]')")
if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install 'emo_jax[test]')",
                allow_module_level=True)

import gcs_helpers  # noqa: E402
from emo_jax import storage  # noqa: E402


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    stats = str(tmp_path_factory.mktemp("gcs") / "served")
    with gcs_helpers.gcs_emulator(stats) as bucket:
        yield bucket


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


def _run(module, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=th.REPO, env=th.cli_env(),
                          text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _assert_same_run(reference, workdir):
    ref, got = th.losses(reference), th.losses(workdir)
    assert sorted(got) == list(range(1, th.STEPS + 1))
    for step in ref:  # bit for bit: same floats, same data checksums
        assert got[step] == ref[step], (step, got[step], ref[step])


@pytest.fixture
def killed_and_resumed(gcs, reference, tmp_path_factory):
    """A gs:// workdir whose first run was SIGKILLed after checkpoint EVERY, then resumed."""
    workdir = f"{gcs}/killed"
    log = tmp_path_factory.mktemp("gcs_kill") / "log"
    proc = th.start_train(workdir, log_path=log)
    done = storage.join(workdir, "checkpoints", str(th.EVERY), "commit_success.txt")
    deadline = time.time() + 300
    while not storage.exists(done):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}):\n{log.read_text()}"
        assert time.time() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = storage.join(workdir, "checkpoints", str(th.STEPS), "commit_success.txt")
    assert not storage.exists(final), "run finished before the kill"
    resumed = th.run_train(workdir)
    return workdir, resumed


@pytest.mark.slow
def test_sigkill_resume_and_unreadable_checkpoint_on_gcs(killed_and_resumed, reference):
    """SIGKILL and resume on gs:// equal the local uninterrupted run; then, on a copy, an
    unreadable newest checkpoint is copied aside and the run falls back exactly."""
    workdir, proc = killed_and_resumed
    assert f"resumed from checkpoint {th.EVERY} in {workdir}/checkpoints" in proc.stdout
    resumed = [r for r in th.records(workdir) if r.get("event") == "resume"]
    assert resumed and resumed[0]["step"] >= th.EVERY
    _assert_same_run(reference, workdir)
    names = storage.listdir(workdir)
    assert {"checkpoints", "config.json", "metrics.jsonl", "tensorboard"} <= set(names), names
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["train"]["steps"] == th.STEPS
    assert storage.listdir(f"{workdir}/tensorboard")
    # the tools read the gs:// workdir like a local one
    from emo_jax.model_files import locate_params

    params_dir, _, meta = locate_params(workdir)
    assert params_dir == f"{workdir}/checkpoints/{th.STEPS}/params" and meta["step"] == th.STEPS
    # (one test, not two: under xdist two tests could each repeat the module fixture's runs)
    _unreadable_newest_checkpoint_on_gcs_is_copied_aside(workdir, reference,
                                                         f"{storage.dirname(workdir)}/corrupt")


@pytest.mark.slow
def test_sigterm_saves_on_gcs_and_resumes_exactly(gcs, reference, tmp_path):
    """SIGTERM after the first step on a gs:// workdir: the run saves a checkpoint there and
    exits 128 + SIGTERM; rerunning the command finishes equal to the local uninterrupted run."""
    workdir = f"{gcs}/terminated"
    log = tmp_path / "log"
    proc = th.start_train(workdir, log_path=log)
    deadline = time.time() + 300
    while not th.step_records(workdir):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}):\n{log.read_text()}"
        assert time.time() < deadline, "timed out waiting for the first step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    if rc == 0:  # the signal came after the last step: nothing to resume
        pytest.skip("SIGTERM came after the end of the run")
    assert rc == 128 + signal.SIGTERM, log.read_text()
    assert "SIGTERM received: saved checkpoint" in log.read_text()
    stopped = [r for r in th.records(workdir) if r.get("event") == "preempted"][0]["step"]
    assert storage.exists(storage.join(workdir, "checkpoints", str(stopped), "commit_success.txt"))
    th.run_train(workdir)
    _assert_same_run(reference, workdir)


def _unreadable_newest_checkpoint_on_gcs_is_copied_aside(source, reference, workdir):
    storage.copytree(source, workdir)
    latest = f"{workdir}/checkpoints/{th.STEPS}"
    fs = storage._fs(latest)  # pylint: disable=protected-access
    for path in storage.find(f"{latest}/params"):
        if fs.size(path) > 100:
            fs.pipe_file(path, b"\0" * 16)  # truncated, as the local test does
    proc = th.run_train(workdir)
    assert f"checkpoints/{th.STEPS} is unreadable" in proc.stderr
    assert f"resumed from checkpoint {th.EVERY}" in proc.stdout
    aside = storage.listdir(f"{workdir}/checkpoints_unreadable")
    assert len(aside) == 1 and aside[0].startswith(f"{th.STEPS}-")
    kept = storage.find(f"{workdir}/checkpoints_unreadable/{aside[0]}")  # bytes kept, not lost
    assert any(p.endswith("commit_success.txt") for p in kept) and len(kept) > 5
    _assert_same_run(reference, workdir)  # steps EVERY+1.. re-run exactly


def test_model_directories_on_gcs_are_complete_only_with_metadata(gcs, tmp_path):
    import jax
    from flax import nnx

    from emo_jax.model_files import (CheckpointError, MODEL_MARKER, WRITING_MARKER,
                                     restore_model, save_model)
    from modular_helpers import random_model, tiny_config

    config = tiny_config()
    model = random_model(config, 0)
    path = f"{gcs}/models/m"
    assert save_model(path, model, config, {"note": "x"}) == path
    assert MODEL_MARKER in storage.listdir(path) and WRITING_MARKER not in storage.listdir(path)
    restored, _, metadata = restore_model(path)
    assert metadata["kind"] == "model" and metadata["note"] == "x"
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="exists"):
        save_model(path, model, config)
    # An interrupted save (arrays written, no metadata.json) is not a model, and the next save
    # writes over it.
    broken = f"{gcs}/models/broken"
    storage.copytree(path, broken)
    storage.remove(f"{broken}/{MODEL_MARKER}")
    storage.write_text(f"{broken}/{WRITING_MARKER}", "")
    with pytest.raises(CheckpointError, match="no emo_jax checkpoint"):
        restore_model(broken)
    save_model(broken, random_model(config, 1), config)
    assert WRITING_MARKER not in storage.listdir(broken)
    # Something that is not ours and not complete is refused, not deleted.
    storage.write_text(f"{gcs}/models/other/file.txt", "mine")
    with pytest.raises(CheckpointError, match="exists"):
        save_model(f"{gcs}/models/other", model, config)
    assert storage.read_text(f"{gcs}/models/other/file.txt") == "mine"
    # Replacing a complete model: the new one is complete before the old one goes.
    other = random_model(config, 2)
    save_model(path, other, config, overwrite=True)
    assert not storage.exists(path + ".partial")
    replaced, _, _ = restore_model(path)
    for a, b in zip(jax.tree.leaves(nnx.state(other)), jax.tree.leaves(nnx.state(replaced))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lazy_extraction_from_gcs_reads_only_the_kept_experts(gcs):
    import jax
    from flax import nnx

    from emo_jax.model_files import save_model
    from emo_jax.modular import lazy, subset as subset_lib
    from emo_jax.modular.runtime import load_model
    from modular_helpers import random_model, tiny_config

    config = tiny_config(num_experts=17, expert_hidden=256)  # 16 routed experts of 3x32x256
    model = random_model(config, 3)
    path = save_model(f"{gcs}/lazy/full", model, config)
    reader = lazy.ParamsReader(path)
    before = gcs.bytes_served()
    for name in reader.names:
        reader.read(name)
    whole = gcs.bytes_served() - before
    subset = subset_lib.make_subset([[1, 5], [0, 9]], config=config, model=model,
                                    method="manual", data={})
    before = gcs.bytes_served()
    report = lazy.extract_lazy(path, subset, f"{gcs}/lazy/small")
    served = gcs.bytes_served() - before
    # 2 of 16 routed experts per layer: a fraction of the checkpoint, about what it keeps
    # (measured: whole 3.19 MB of 3.44 MB of arrays; lazy 0.77 MB for 0.69 MB kept)
    assert whole >= report["checkpoint_bytes"] * 0.8, (whole, report)
    assert served < 0.3 * whole, (served, whole, report)
    assert served < 1.25 * report["bytes_read"] + 64 * 1024, (served, report)
    small, small_config, metadata = load_model(f"{gcs}/lazy/small")
    assert small_config.moe.num_experts == 3 and metadata["extract"]["lazy"]
    full = nnx.to_pure_dict(nnx.state(model))["blocks"]["moe"]["w_gate"]
    got = nnx.to_pure_dict(nnx.state(small))["blocks"]["moe"]["w_gate"]
    np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(full)[1, [0, 9]])
    assert jax.tree.leaves(nnx.state(small))


def test_eval_extract_convert_take_gcs_model_directories(gcs, tmp_path):
    from emo_jax.model_files import save_model
    from emo_jax.modular import subset as subset_lib
    from modular_helpers import random_model, tiny_config

    config = tiny_config()
    model = random_model(config, 4)
    path = save_model(f"{gcs}/tools/m", model, config)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(4)))
    remote_data = f"{gcs}/tools/data/docs.jsonl"
    storage.copy_file(str(data), remote_data)
    # eval: a gs:// model, gs:// data, a gs:// result file
    _run("emo_jax.eval", f"--checkpoint={path}", f"--data={remote_data}",
         f"--out={gcs}/tools/eval.json")
    result = json.loads(storage.read_text(f"{gcs}/tools/eval.json"))
    assert result["checkpoint"] == path and np.isfinite(result["loss"])
    # extract: a gs:// subset file and model in, a gs:// model out
    subset = subset_lib.make_subset([[1, 2, 5], [0, 6, 7]], config=config, model=model,
                                    method="manual", data={})
    subset_lib.save(subset, f"{gcs}/tools/subset.json")
    _run("emo_jax.extract", f"--checkpoint={path}", f"--subset={gcs}/tools/subset.json",
         f"--out={gcs}/tools/small")
    assert "metadata.json" in storage.listdir(f"{gcs}/tools/small")
    # convert: gs:// model -> local Hugging Face folder -> gs:// model, identical parameters
    _run("emo_jax.convert", f"--checkpoint={gcs}/tools/small", f"--to_hf={tmp_path / 'hf'}")
    _run("emo_jax.convert", f"--from_hf={tmp_path / 'hf'}", f"--out={gcs}/tools/back")
    from emo_jax.modular.runtime import load_model
    import jax
    from flax import nnx

    a, _, _ = load_model(f"{gcs}/tools/small")
    b, _, meta = load_model(f"{gcs}/tools/back")
    assert meta["source"]["format"] == "huggingface"
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
