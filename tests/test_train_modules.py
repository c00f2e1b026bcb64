"""Module fine-tuning (emo_jax/train/modules.py, `python -m emo_jax.train --trainable=...`): after
training a subset's experts on one domain, every frozen value (attention, embeddings, norms, the
head, shared experts, the other experts inside the same stacked arrays, the other router
columns) is bit-identical to the initial checkpoint, the trained experts changed, the domain's
loss fell, the optimizer state shrank, and a resumed run ends bit for bit where an uninterrupted
one does."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers as th
from emo_jax import model_files
from emo_jax.config import ConfigError, validate
from emo_jax.data.sources import read_documents
from emo_jax.modular import lazy, subset as subset_lib
from emo_jax.train import modules
from emo_jax.train import step as step_lib

from modular_helpers import random_model, tiny_config

KEPT = [[1, 5, 9], [0, 7, 14]]  # 3 of the 15 routed experts of configs/tiny.py, per layer
EXPERTS = ("w_gate", "w_up", "w_down")


def tiny_run_config():
    sys.path.insert(0, os.path.join(th.REPO, "configs"))
    from tiny import get_config  # pylint: disable=import-outside-toplevel

    return validate(get_config())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model directory (configs/tiny.py shapes, random weights), the subset file, and
    a JSONL of one domain's documents (python, from the bundled corpus)."""
    d = tmp_path_factory.mktemp("modules")
    config = tiny_run_config()
    model = random_model(config, 0)
    base = model_files.save_model(str(d / "base"), model, config)
    subset = subset_lib.make_subset(KEPT, config=config, model=model, method="manual", data={})
    subset_path = subset_lib.save(subset, str(d / "python.json"))
    docs = [doc for doc in read_documents("bundled:train") if doc["domain"] == "python"][:120]
    domain = d / "python.jsonl"
    domain.write_text("".join(json.dumps({"text": x["text"], "domain": "python"}) + "\n"
                              for x in docs))
    return {"dir": d, "base": base, "subset": subset_path, "domain": str(domain),
            "config": config}


def train(setup, workdir, steps, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "emo_jax.train", f"--config={th.REPO}/configs/tiny.py",
         f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.checkpoint.every=6",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.eval_batches=2", "--config.train.lr=0.01",
         "--config.train.warmup_steps=1", "--config.train.schedule=constant",
         f"--config.data.train_sources={setup['domain']}",
         f"--config.data.eval_sources={setup['domain']}", *extra],
        cwd=th.REPO, env=th.cli_env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out}\n{err}"
    return out + err


def arrays(path) -> dict:
    reader = lazy.ParamsReader(path)
    return {name: reader.read(name) for name in reader.names}


def same(a, b) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.slow
def test_module_fine_tuning_freezes_everything_else(setup):
    d = setup["dir"]
    args = (f"--init_checkpoint={setup['base']}", f"--trainable={setup['subset']}")
    full_run, first_half = (train(setup, d / "run", 12, *args),
                            train(setup, d / "resumed", 6, *args))
    log = finish(full_run)
    finish(first_half)
    # The rerun resumes without --trainable/--init_checkpoint: the workdir records them.
    finish(train(setup, d / "resumed", 12))

    assert "module fine-tuning: 3 of 15 routed experts per layer" in log
    event = [r for r in th.records(d / "run") if r.get("event") == "module_fine_tuning"][0]
    # AdamW moments for the trained rows only: 2 x (3 x 3 x 64 x 64 + 64 x 3) x 2 layers floats.
    trained = 2 * (3 * 3 * 64 * 64 + 64 * 3)
    assert event["trainable_params"] == trained
    assert event["optimizer_bytes"] < 0.2 * event["optimizer_bytes_full_training"]
    assert abs(event["optimizer_bytes"] - 2 * 4 * trained) < 1024

    before, after = arrays(setup["base"]), arrays(str(d / "run"))
    assert sorted(before) == sorted(after)
    kept = np.zeros((2, 15), bool)
    for layer, ids in enumerate(KEPT):
        kept[layer, ids] = True
    for name in before:
        leaf = name.split("/")[-1]
        if name.startswith("blocks/moe/") and leaf in EXPERTS:
            assert same(before[name][~kept], after[name][~kept]), name  # other experts
            changed = [not np.array_equal(before[name][l, e], after[name][l, e])
                       for l, ids in enumerate(KEPT) for e in ids]
            assert all(changed), name
        elif name == "blocks/moe/router":
            frozen_cols = np.swapaxes(before[name], 1, 2)[~kept]
            assert same(frozen_cols, np.swapaxes(after[name], 1, 2)[~kept])
            assert not np.array_equal(np.swapaxes(before[name], 1, 2)[kept],
                                      np.swapaxes(after[name], 1, 2)[kept])
        else:  # attention, norms, embedding, head, shared experts
            assert same(before[name], after[name]), name

    # The domain's loss fell: the same documents through the model before and after.
    from emo_jax.data.pipeline import pack_documents
    from emo_jax.data.tokenizers import make_tokenizer
    from emo_jax.evaluation import token_losses
    from emo_jax.model_files import restore_model

    docs = read_documents(setup["domain"])[:24]
    batch = next(iter(pack_documents(docs, make_tokenizer("byte"), 128, 16)))
    batch = {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")}

    @nnx.jit
    def loss(model):
        ce, predicted = token_losses(model, batch)
        return ce.sum() / predicted.sum()

    one_device = jax.make_mesh((1, 1, 1), ("data", "fsdp", "expert"), devices=jax.devices()[:1],
                               axis_types=(jax.sharding.AxisType.Auto,) * 3)
    losses = {name: float(loss(restore_model(path, mesh=one_device)[0]))
              for name, path in (("before", setup["base"]), ("after", str(d / "run")))}
    print(f"python-domain loss: {losses['before']:.4f} before, {losses['after']:.4f} after; "
          f"optimizer state {event['optimizer_bytes']:,} bytes (training everything: "
          f"{event['optimizer_bytes_full_training']:,})")
    assert losses["after"] < losses["before"] - 0.05, losses

    # Resuming restored the rows' AdamW state and the data position: same end, bit for bit.
    resumed = arrays(str(d / "resumed"))
    for name in after:
        assert same(after[name], resumed[name]), name
    steps = th.step_records(d / "resumed")
    assert min(steps) == 1 and max(steps) == 12


def _state_from(model, trainable, config, shardings):
    """A fresh TrainState's nnx.State with `model`'s weights, built without compiling the
    random initialisers (which dominate the time of a fresh init_state on 2 cores)."""
    abstract = nnx.state(nnx.eval_shape(lambda: step_lib.TrainState(config,
                                                                     trainable=trainable)))
    pure = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(abstract))
    pure["model"] = nnx.to_pure_dict(nnx.state(model))
    pure["rng"] = np.asarray(jax.random.PRNGKey(0))
    pure["rows"]["idx"] = trainable.idx_LK()
    nnx.replace_by_pure_dict(abstract, pure)
    state = jax.device_put(abstract, shardings)
    modules.refresh_rows(state, shardings)
    return state


def _two_steps(model, config, trainable, batch):
    """The initial state and the state after two train steps, on one device."""
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "expert"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    graphdef, _, shardings = step_lib.abstract_state(config, mesh, trainable)
    state = _state_from(model, trainable, config, shardings)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    train_step = step_lib.make_train_step(config, graphdef, shardings, mesh)
    for _ in range(2):
        state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return before, jax.tree.map(np.asarray, nnx.to_pure_dict(state)), metrics


@pytest.mark.parametrize("mode", ["none", "all"])
def test_router_modes_and_weight_decay(mode):
    """train_router='none' keeps the router bit-identical, 'all' trains all of it; weight decay
    (on here) never touches a frozen value; the optimizer holds the rows only."""
    config = tiny_config()
    config.train.weight_decay = 0.5
    config.train.warmup_steps = 1
    model = random_model(config, 3)
    subset = subset_lib.make_subset([[0, 3, 6], [2, 4, 7]], config=config, model=model,
                                    method="manual", data={})
    trainable = modules.make_trainable(subset, config, mode)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 48)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(48, dtype=np.int32), tokens.shape).copy()}
    before, after, metrics = _two_steps(model, config, trainable, batch)
    assert float(metrics["step_ok"]) == 1.0
    moments = jax.tree.leaves(after["optimizer"])
    assert max(x.size for x in moments) == 2 * 3 * 32 * 32  # [L, K, D, F]: rows only
    m0, m1 = before["model"], after["model"]
    mask = np.zeros((2, 8), bool)
    for layer, ids in enumerate(subset.layers):
        mask[layer, ids] = True
    for name in EXPERTS:
        assert same(m0["blocks"]["moe"][name][~mask], m1["blocks"]["moe"][name][~mask])
        assert not np.array_equal(m0["blocks"]["moe"][name][mask], m1["blocks"]["moe"][name][mask])
        np.testing.assert_array_equal(after["rows"][name],
                                      m1["blocks"]["moe"][name][mask].reshape(2, 3, 32, 32))
    router0, router1 = m0["blocks"]["moe"]["router"], m1["blocks"]["moe"]["router"]
    if mode == "none":
        assert same(router0, router1) and "router" not in after["rows"]
    else:  # 'all': the other experts' columns train too
        assert not np.array_equal(np.swapaxes(router0, 1, 2)[~mask],
                                  np.swapaxes(router1, 1, 2)[~mask])
    flat0, flat1 = flatten(m0), flatten(m1)
    for name, value in flat0.items():
        if not name.startswith("blocks/moe/") or name.split("/")[-1].startswith("shared"):
            assert same(value, flat1[name]), name


def flatten(tree) -> dict:
    return {"/".join(str(k.key) for k in path): value
            for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_run_records_and_refusals(setup, tmp_path):
    """--train_router needs --trainable; a workdir resumes what it records and refuses other
    experts; a full-training workdir refuses --trainable; the subset must fit the model."""
    config = setup["config"]
    subset = subset_lib.load(setup["subset"])
    with pytest.raises(ConfigError, match="--train_router needs --trainable"):
        modules.for_run(str(tmp_path), None, "all", config, resuming=False)
    wanted = modules.for_run(str(tmp_path), setup["subset"], None, config, resuming=False)
    assert wanted.train_router == "rows" and wanted.layers == tuple(map(tuple, KEPT))
    modules.record(str(tmp_path), wanted)
    assert modules.for_run(str(tmp_path), None, None, config, resuming=True) == wanted
    other = subset_lib.make_subset([[1, 5, 10], [0, 7, 14]], config=config,
                                   model=random_model(config, 0), method="manual", data={})
    with pytest.raises(ConfigError, match="fine-tunes other experts"):
        modules.for_run(str(tmp_path), other, None, config, resuming=True)
    with pytest.raises(ConfigError, match="fine-tunes other experts"):
        modules.for_run(str(tmp_path), subset, "none", config, resuming=True)
    with pytest.raises(ConfigError, match="trains every parameter"):
        modules.for_run(str(tmp_path / "full"), subset, None, config, resuming=True)
    with pytest.raises(subset_lib.SubsetError, match="another model"):
        modules.make_trainable(subset, tiny_config(), "rows")


def test_init_checkpoint_adopts_the_model_shape(setup):
    """An extracted model (5 experts, top_k 2) fine-tunes from a config of the full model:
    the run takes the checkpoint's expert count, with a note."""
    from emo_jax.modular import extract

    config = setup["config"]
    model = random_model(config, 0)
    small, small_config, _ = extract.extract(model, config, subset_lib.load(setup["subset"]))
    small_config.moe.top_k = 1
    path = model_files.save_model(str(setup["dir"] / "small"), small, validate(small_config))
    adopted = model_files.adopt_shape(config, path)
    assert (adopted.moe.num_experts, adopted.moe.top_k) == (4, 1)
    assert (config.moe.num_experts, config.moe.top_k) == (16, 2)  # the caller's is unchanged
    assert adopted.model.to_dict() == config.model.to_dict()
    assert model_files.adopt_shape(config, setup["base"]) is config
