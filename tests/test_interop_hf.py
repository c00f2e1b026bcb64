"""Hugging Face interop: bit-exact round trips, an independent NumPy forward pass of the HF layout,
sharded safetensors, and clear refusals that leave no output behind."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from emo_jax.interop import conversion as convert
from emo_jax.config import default_config, validate
from emo_jax.interop import hf, safetensors_io
from emo_jax.interop.hf import InteropError
from emo_jax.model_files import restore_model, save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_experts=7, shared=1, top_k=2, kv_heads=2, **model):
    c = default_config()
    c.model.update(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                   head_dim=8, rope_theta=500.0)
    c.model.update(**model)
    c.moe.update(num_experts=num_experts, num_shared_experts=shared, top_k=top_k,
                 expert_hidden=16, pool_min=top_k, pool_max=num_experts, block_size=8)
    c.data.seq_len = 24
    return validate(c)


def random_params(config, seed=0):
    """Every parameter random (norm scales too), at a scale where the logits discriminate."""
    rng = np.random.default_rng(seed)
    shapes = hf.param_shapes(config)
    return {k: (1.0 + 0.2 * rng.standard_normal(s) if k.endswith("scale")
                else 0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def assert_params_identical(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == np.float32, key
        assert np.array_equal(a[key], b[key]), key  # bit-exact (no tolerance)


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".converting-" in n or n.endswith(".partial")]


def save_tiny_model(tmp_path, config, params, name="model", metadata=None):
    return save_model(str(tmp_path / name), hf.model_from_params(config, params), config,
                      metadata)


def run_module(module, *args):
    """`python -m module args` on one CPU device (without the 8 simulated devices of tests)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(env, JAX_PLATFORMS="cpu"))


def run_cli(*args):
    return run_module("emo_jax.convert", *args)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shared,kv_heads", [(0, 4), (1, 2), (2, 1)])
def test_mapping_round_trip_is_bit_exact(shared, kv_heads):
    config = tiny_config(num_experts=5 + shared, shared=shared, kv_heads=kv_heads)
    params = random_params(config, seed=shared)
    hf_config = json.loads(json.dumps(hf.config_to_hf(config)))  # through JSON, like the file
    tensors = hf.params_to_hf(params, config)
    assert {k: v.shape for k, v in tensors.items()} == hf.hf_shapes(config)
    gate = tensors["model.layers.1.mlp.gate.weight"]
    np.testing.assert_array_equal(gate[:5], params["blocks.moe.router"][1].T)
    if shared > 1:  # the shared experts' own router rows, last, carried exactly
        np.testing.assert_array_equal(gate[5:], params["blocks.moe.shared_router"][1].T)
        assert gate[5:].any()
    else:  # one shared expert: its softmax is 1.0 whatever the row, written as zeros
        assert not gate[5:].any()
    back_config, _ = hf.config_from_hf(hf_config)
    assert back_config.to_dict() == config.to_dict()
    back, notes = hf.params_from_hf(tensors, back_config)
    assert notes == []
    assert_params_identical(params, back)


def test_cli_round_trip_tiny_model_is_bit_exact(tmp_path):
    config = tiny_config()
    params = random_params(config, seed=1)
    model_dir = save_tiny_model(tmp_path, config, params)
    out = run_cli(f"--checkpoint={model_dir}", f"--to_hf={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["num_experts"] == 7 and written["num_experts_per_tok"] == 3
    assert written["num_shared_experts"] == 1 and "num_experts_per_layer" not in written
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    out = run_cli(f"--from_hf={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}")
    assert out.returncode == 0, out.stderr
    model, back_config, metadata = restore_model(str(tmp_path / "back"))
    assert_params_identical(params, hf.model_params(model))
    assert back_config.to_dict() == config.to_dict()
    assert metadata["source"]["format"] == "huggingface"
    assert metadata["source"]["path"] == str(tmp_path / "hf")
    assert metadata["source"]["lineage"]["path"] == model_dir
    assert metadata["hf_config"]["num_experts"] == 7
    assert leftovers(tmp_path) == []


def test_round_trip_extracted_subset_is_bit_exact(tmp_path):
    from emo_jax.modular import subset as subset_lib

    config = tiny_config(num_experts=9)
    full = random_params(config, seed=2)
    full_dir = save_tiny_model(tmp_path, config, full, name="full")
    keep_LK = [[1, 3, 6], [0, 4, 7]]  # different experts in each layer, the same count
    subset = subset_lib.make_subset(keep_LK, config=config,
                                    model=hf.model_from_params(config, full), method="random",
                                    data={"text": "test"})
    (tmp_path / "subset.json").write_text(json.dumps(subset.to_json()))
    out = run_module("emo_jax.extract", f"--checkpoint={full_dir}",
                     f"--subset={tmp_path / 'subset.json'}", f"--out={tmp_path / 'small'}")
    assert out.returncode == 0, out.stderr
    small, small_config, _ = restore_model(str(tmp_path / "small"))
    params = hf.model_params(small)
    assert small_config.moe.num_experts == 4 and small_config.moe.top_k == 2

    out = run_cli(f"--checkpoint={tmp_path / 'small'}", f"--to_hf={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["num_experts"] == 4 and written["num_experts_per_layer"] == [4, 4]
    assert written["num_experts_per_tok"] == 3 and written["num_shared_experts"] == 1
    assert written["emo_jax"]["lineage"]["subset"]["layers"] == keep_LK
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for layer, ids in enumerate(keep_LK):
        gate = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        np.testing.assert_array_equal(gate[:3], full["blocks.moe.router"][layer][:, ids].T)
        for slot, e in enumerate(ids):
            np.testing.assert_array_equal(
                tensors[f"model.layers.{layer}.mlp.experts.{slot}.up_proj.weight"],
                full["blocks.moe.w_up"][layer, e].T)
        np.testing.assert_array_equal(  # the shared expert comes last
            tensors[f"model.layers.{layer}.mlp.experts.3.down_proj.weight"],
            full["blocks.moe.shared_down"][layer, 0].T)

    out = run_cli(f"--from_hf={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}")
    assert out.returncode == 0, out.stderr
    model, back_config, _ = restore_model(str(tmp_path / "back"))
    assert_params_identical(params, hf.model_params(model))
    assert back_config.to_dict() == small_config.to_dict()


@pytest.mark.slow
def test_training_workdir_step_exports_and_imports(tmp_path):
    workdir = tmp_path / "run"
    out = run_module("emo_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                     "--config.train.steps=2", "--config.checkpoint.every=1",
                     "--config.checkpoint.async_save=False", "--config.data.batch_size=2",
                     "--config.data.seq_len=32", "--config.train.eval_every=0",
                     "--config.train.eval_batches=1")
    assert out.returncode == 0, out.stderr
    out = run_cli(f"--checkpoint={workdir}", f"--to_hf={tmp_path / 'hf'}", "--step=1")
    assert out.returncode == 0, out.stderr
    lineage = json.loads((tmp_path / "hf" / "config.json").read_text())["emo_jax"]["lineage"]
    assert lineage["step"] == 1 and lineage["kind"] == "workdir"
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    trained, config, _ = restore_model(str(workdir), step=1)
    back, back_config, _ = restore_model(str(tmp_path / "back"))
    assert_params_identical(hf.model_params(trained), hf.model_params(back))
    assert back_config.to_dict() == config.to_dict()


def test_bfloat16_export_rounds_once_and_imports_exactly(tmp_path):
    config = tiny_config()
    params = random_params(config, seed=3)
    model_dir = save_tiny_model(tmp_path, config, params)
    convert.export_hf(model_dir, str(tmp_path / "hf"), dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    model, _, _ = restore_model(str(tmp_path / "back"))
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    assert_params_identical(rounded, hf.model_params(model))


def test_sharded_export_writes_an_index_and_reads_back(tmp_path):
    config = tiny_config()
    params = random_params(config, seed=4)
    model_dir = save_tiny_model(tmp_path, config, params)
    convert.export_hf(model_dir, str(tmp_path / "hf"), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / safetensors_io.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(hf.hf_shapes(config))
    sizes = {n: os.path.getsize(tmp_path / "hf" / n) for n in shards}
    assert all(s < 20_000 + 8_192 for s in sizes.values())  # data <= limit, plus the header
    assert index["metadata"]["total_size"] == 4 * sum(
        int(np.prod(s)) for s in hf.hf_shapes(config).values())
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(tmp_path / "hf" / n).st_mode & 0o777 for n in shards} == {0o666 & ~umask}
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    model, _, _ = restore_model(str(tmp_path / "back"))
    assert_params_identical(params, hf.model_params(model))


def test_parse_size():
    assert safetensors_io.parse_size("5GB") == 5 * 10**9
    assert safetensors_io.parse_size("2MiB") == 2 * 2**20
    assert safetensors_io.parse_size("1234") == 1234
    with pytest.raises(InteropError, match="not a size"):
        safetensors_io.parse_size("lots")


def test_tokenizer_files_travel_both_ways(tmp_path):
    # the ids come from the imported config, so the (fake) tokenizer is never read
    cfg, tensors = hand_made_hf(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    write_hf_model(tmp_path / "hf", cfg, tensors)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    _, config, _ = restore_model(str(tmp_path / "model"))
    assert config.data.tokenizer == f"hf:{tmp_path / 'model' / 'tokenizer' / 'tokenizer.json'}"
    assert (tmp_path / "model" / "tokenizer" / "tokenizer_config.json").is_file()
    convert.export_hf(str(tmp_path / "model"), str(tmp_path / "hf2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf2" / name).read_text() == (tmp_path / "hf" / name).read_text()


# --------------------------------------------- an independent NumPy forward of the HF layout


def numpy_hf_forward(tensors, cfg, tokens):
    """Logits of one document (positions 0..S-1) from the Hugging Face EMO layout, in float64,
    written from the format's description only (issue 8), not from emo_jax code."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = cfg.get("head_dim") or d // heads
    shared = cfg["num_shared_experts"]
    top = cfg["num_experts_per_tok"] - shared  # routed experts per token
    eps, s = cfg["rms_norm_eps"], len(tokens)

    def rms_norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rotate_half(x):
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, dh, 2) / dh)
    freqs = np.arange(s)[:, None] * inv_freq[None]  # [S, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [S, 1, Dh]
    cos, sin = np.cos(emb), np.sin(emb)

    def silu(x):
        return x / (1.0 + np.exp(-x))

    h = t["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms_norm(h, t[p + "pre_attention_layernorm.weight"])
        q = (a @ t[p + "self_attn.q_proj.weight"].T).reshape(s, heads, dh)
        k = (a @ t[p + "self_attn.k_proj.weight"].T).reshape(s, kv, dh)
        v = (a @ t[p + "self_attn.v_proj.weight"].T).reshape(s, kv, dh)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(s, heads * dh)
        h = h + attn @ t[p + "self_attn.o_proj.weight"].T

        x = rms_norm(h, t[p + "pre_feedforward_layernorm.weight"])
        gate_w = t[p + "mlp.gate.weight"]
        routed = gate_w.shape[0] - shared  # shared experts are the last rows

        def expert(e, xt):
            w = lambda n: t[p + f"mlp.experts.{e}.{n}_proj.weight"]  # noqa: E731
            return w("down") @ (silu(w("gate") @ xt) * (w("up") @ xt))

        def softmax(z):
            z = np.exp(z - z.max())
            return z / z.sum()

        y = np.zeros_like(x)
        for tok in range(s):
            soft = softmax(gate_w[:routed] @ x[tok])  # over the routed experts only
            for e in np.argsort(-soft)[:top]:
                y[tok] += soft[e] * expert(e, x[tok])  # not renormalised
            # the reference's shared experts: a second softmax over their own logits (the last
            # rows of mlp.gate) weights each one (modeling_emo.py; 1.0 for a single one)
            shared_soft = softmax(gate_w[routed:] @ x[tok])
            for e in range(routed, routed + shared):
                y[tok] += shared_soft[e - routed] * expert(e, x[tok])
        h = h + y
    return rms_norm(h, t["model.norm.weight"]) @ t["lm_head.weight"].T


def write_hf_model(path, cfg, tensors, files=1):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    if files == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    chunks = np.array_split(np.arange(len(names)), files)
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        file_name = f"model-{i:05d}-of-{files:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in chunk}, str(path / file_name))
        weight_map.update({names[j]: file_name for j in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def hand_made_hf(num_experts=6, shared=1, top_k=2, layers=2, d=24, heads=4, kv=2, dh=8,
                 f=12, vocab=50, seed=0, per_layer=None, **extra):
    """A config.json dict and random tensors in the HF layout, made without emo_jax.

    per_layer: the reference's num_experts_per_layer (layer i gets per_layer[i] experts, its
    shared ones last); num_experts is then the largest."""
    if per_layer is not None:
        num_experts, layers = max(per_layer), len(per_layer)
        extra = {"num_experts_per_layer": list(per_layer), **extra}
    counts = list(per_layer) if per_layer is not None else [num_experts] * layers
    cfg = {"architectures": ["EmoForCausalLM"], "model_type": "emo", "vocab_size": vocab,
           "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": dh,
           "rope_theta": 1000.0, "rms_norm_eps": 1e-5, "num_experts": num_experts,
           "num_experts_per_tok": top_k + shared, "num_shared_experts": shared,
           "norm_topk_prob": False, "tie_word_embeddings": False, "hidden_act": "silu",
           "max_position_embeddings": 64, **extra}
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    norm = lambda: (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": norm(),
         "lm_head.weight": r(vocab, d)}
    for i, count in enumerate(counts):
        p = f"model.layers.{i}."
        t.update({p + "pre_attention_layernorm.weight": norm(),
                  p + "pre_feedforward_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": r(heads * dh, d),
                  p + "self_attn.k_proj.weight": r(kv * dh, d),
                  p + "self_attn.v_proj.weight": r(kv * dh, d),
                  p + "self_attn.o_proj.weight": r(d, heads * dh),
                  p + "mlp.gate.weight": r(count, d)})  # shared rows nonzero
        for e in range(count):
            t.update({p + f"mlp.experts.{e}.gate_proj.weight": r(f, d),
                      p + f"mlp.experts.{e}.up_proj.weight": r(f, d),
                      p + f"mlp.experts.{e}.down_proj.weight": r(d, f)})
    return cfg, t


@pytest.mark.parametrize("shared,kv", [(1, 2), (2, 4), (3, 2)])
def test_imported_model_matches_numpy_forward_of_hf_layout(tmp_path, shared, kv):

    cfg, tensors = hand_made_hf(num_experts=5 + shared, shared=shared, kv=kv, seed=shared)
    write_hf_model(tmp_path / "hf", cfg, tensors, files=2)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    restored, config, metadata = restore_model(str(tmp_path / "model"))
    assert config.moe.eval_pool == 0 and config.moe.top_k == 2
    assert config.moe.num_experts == 5 + shared and config.moe.num_shared_experts == shared
    # one shared expert: its row cannot matter and is dropped; more: carried as shared_router
    assert any("dropped the nonzero router row" in n for n in metadata["notes"]) == (shared == 1)
    model = hf.model_from_params(config, hf.model_params(restored))  # one device, host arrays

    tokens = np.random.default_rng(5).integers(0, cfg["vocab_size"], 12)
    s = len(tokens)
    logits = model(jnp.asarray(tokens[None], jnp.int32), jnp.ones((1, s), jnp.int32),
                   jnp.arange(s, dtype=jnp.int32)[None]).logits_BSV
    expected = numpy_hf_forward(tensors, cfg, tokens)
    assert np.abs(expected).max() > 1.0  # logits large enough for the comparison to mean much
    print("max |emo_jax - numpy|:", np.abs(np.asarray(logits[0]) - expected).max())
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=1e-4, atol=1e-4)


def test_two_shared_experts_import_export_is_bit_exact(tmp_path):
    """A reference model with 2 shared experts: import then export gives back every tensor bit
    for bit, the shared experts' router rows (the last rows of mlp.gate) included."""
    cfg, tensors = hand_made_hf(num_experts=7, shared=2, seed=11)
    write_hf_model(tmp_path / "hf", cfg, tensors)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    restored, config, metadata = restore_model(str(tmp_path / "model"))
    assert config.moe.num_shared_experts == 2 and not any("dropped" in n
                                                          for n in metadata["notes"])
    params = hf.model_params(restored)
    np.testing.assert_array_equal(params["blocks.moe.shared_router"][1],
                                  tensors["model.layers.1.mlp.gate.weight"][5:].T)
    convert.export_hf(str(tmp_path / "model"), str(tmp_path / "hf2"))
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert written["num_shared_experts"] == 2 and written["num_experts_per_tok"] == 4
    back = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == np.float32 and np.array_equal(back[name], value), name


def test_numpy_forward_pins_shared_expert_weighting():
    """Control: with 2 shared experts, weighting each by 1.0 (emo_jax before the reference's
    shared softmax) gives clearly different logits, so the forward test above pins it."""
    cfg, tensors = hand_made_hf(num_experts=7, shared=2, seed=3)
    tokens = np.arange(10) % cfg["vocab_size"]
    base = numpy_hf_forward(tensors, cfg, tokens)
    # shared rows equal: softmax 0.5 each; doubling both shared down projections = weight 1.0
    ones = dict(tensors)
    for i in range(cfg["num_hidden_layers"]):
        gate = tensors[f"model.layers.{i}.mlp.gate.weight"].copy()
        gate[5:] = 0.0
        ones[f"model.layers.{i}.mlp.gate.weight"] = gate
    half = numpy_hf_forward(ones, cfg, tokens)
    for i in range(cfg["num_hidden_layers"]):
        for e in (5, 6):
            name = f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"
            ones[name] = tensors[name] * 2.0
    assert np.abs(numpy_hf_forward(ones, cfg, tokens) - half).max() > 1e-2
    assert np.abs(half - base).max() > 1e-2


def test_numpy_forward_pins_shared_expert_placement(tmp_path):
    """Control: the same tensors read with shared experts FIRST give different logits."""
    cfg, tensors = hand_made_hf(seed=7)
    tokens = np.arange(10) % cfg["vocab_size"]
    base = numpy_hf_forward(tensors, cfg, tokens)
    swapped = dict(tensors)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("gate", "up", "down"):
            a, b = (f"model.layers.{i}.mlp.experts.{e}.{n}_proj.weight" for e in (0, 5))
            swapped[a], swapped[b] = tensors[b], tensors[a]
    assert np.abs(numpy_hf_forward(swapped, cfg, tokens) - base).max() > 1e-2


# --------------------------------------------------------------------------------- bad inputs


def assert_refused(tmp_path, fn, match, out="out"):
    with pytest.raises(InteropError, match=match):
        fn(str(tmp_path / out))
    assert not (tmp_path / out).exists()
    assert leftovers(tmp_path) == []


def test_missing_config_json_is_refused(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", cfg, tensors)
    (tmp_path / "hf" / "config.json").unlink()
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   "config.json is missing")


def test_missing_tensor_is_named(tmp_path):
    cfg, tensors = hand_made_hf()
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    write_hf_model(tmp_path / "hf", cfg, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   r"tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight .* is missing")


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    cfg, tensors = hand_made_hf()
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    write_hf_model(tmp_path / "hf", cfg, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   "q_norm")
    cfg, tensors = hand_made_hf()
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    write_hf_model(tmp_path / "hf2", cfg, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf2"), out),
                   r"model\.norm\.weight .* has shape \(7,\)")


def test_truncated_safetensors_file_is_named(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", cfg, tensors, files=3)
    shard = tmp_path / "hf" / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   "model-00002-of-00003.safetensors is not a readable safetensors file")


def test_missing_shard_is_named(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", cfg, tensors, files=3)
    (tmp_path / "hf" / "model-00003-of-00003.safetensors").unlink()
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   "model-00003-of-00003.safetensors is missing")


@pytest.mark.parametrize("change,match", [
    ({"tie_word_embeddings": True}, "tie_word_embeddings is true"),
    ({"norm_topk_prob": True}, "norm_topk_prob is true"),
    ({"model_type": "olmoe"}, "model_type is 'olmoe'"),
    ({"qk_norm": True}, "qk_norm is true"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"num_experts_per_tok": 1}, "must exceed num_shared_experts"),
    ({"hidden_size": "24"}, "hidden_size is '24'; expected a whole number"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling is"),
])
def test_inexpressible_hf_config_is_refused(tmp_path, change, match):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", {**cfg, **change}, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out), match)


def test_uniform_num_experts_per_layer_is_accepted(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", {**cfg, "num_experts": 128, "num_experts_per_layer": [6, 6]},
                   tensors)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    _, config, _ = restore_model(str(tmp_path / "out"))
    assert config.moe.num_experts == 6
    convert.export_hf(str(tmp_path / "out"), str(tmp_path / "hf2"))  # still a pruned model
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert written["num_experts"] == 6 and written["num_experts_per_layer"] == [6, 6]


def test_qk_norm_model_is_refused_on_export(tmp_path):
    config = tiny_config(qk_norm=True)
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    assert_refused(tmp_path, lambda out: convert.export_hf(model_dir, out), "model.qk_norm is True")


def test_existing_output_is_not_touched(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", cfg, tensors)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="already exists"):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    config = tiny_config()
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    calls = []

    def failing_save(arrays, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(arrays, path, metadata=metadata)

    monkeypatch.setattr(safetensors_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert.export_hf(model_dir, str(tmp_path / "hf"), max_shard_bytes=20_000)
    assert len(calls) == 2  # one shard was complete when it failed
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_cli_reports_one_clear_line(tmp_path):
    (tmp_path / "hf").mkdir()
    out = run_cli(f"--from_hf={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'hf' / 'config.json'} is missing: a Hugging Face model folder " \
        "needs config.json"
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------ exports the reference loader accepts (issue 15, item 1)

# Every argument of the reference's `EmoConfig.__init__` (allenai/EMO,
# src/hf_trust_remote_code/emo/configuration_emo.py) that changes the model it builds; an
# export writes each explicitly so that none of the loader's defaults (pad_token_id 100277,
# eos_token_id 100257, ...) applies. num_experts_per_layer: subsets and models with per-layer
# expert counts only.
LOADER_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
    "num_experts_per_tok", "num_experts", "output_router_logits", "router_aux_loss_coef",
    "norm_topk_prob", "num_shared_experts", "num_shared_experts_per_layer",
    "always_active_experts", "always_active_experts_per_layer", "dense_intermediate_size",
    "dense_mlp_bias", "ghost_extend_eval")


def assert_reference_loads(hf_dir, remote=None):
    """The exported folder against the rules of the reference's loader, as written there:
    config keys and values, and every tensor shape its modules (EmoModel, EmoAttention,
    EmoSparseMoeBlock, EmoMLP) would allocate from that config."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "emo" and cfg["architectures"] == ["EmoForCausalLM"]
    assert [k for k in LOADER_KEYS if k not in cfg] == []
    v, d, layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):  # nn.Embedding(padding_idx)
        assert cfg[key] is None or (isinstance(cfg[key], int) and 0 <= cfg[key] < v), key
    assert isinstance(cfg["pad_token_id"], int) and isinstance(cfg["eos_token_id"], int)
    assert cfg["hidden_act"] == "silu" and cfg["rope_scaling"] is None
    assert not cfg["tie_word_embeddings"] and not cfg["norm_topk_prob"]
    assert not cfg["attention_bias"] and not cfg["ghost_extend_eval"]
    assert cfg["always_active_experts"] is None and cfg["always_active_experts_per_layer"] is None
    assert cfg["num_shared_experts_per_layer"] is None
    shared = cfg["num_shared_experts"]
    assert shared <= cfg["num_experts"]  # the loader asserts it
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert heads % kv == 0
    head_dim = cfg.get("head_dim", d // heads)  # getattr(config, "head_dim", ...)
    counts = cfg.get("num_experts_per_layer") or [cfg["num_experts"]] * layers
    assert len(counts) == layers and all(c > 0 for c in counts)  # 0 = dense layer: not ours
    f = cfg["intermediate_size"]
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
                "lm_head.weight": (v, d)}
    for i, count in enumerate(counts):
        routed_k = cfg["num_experts_per_tok"] - min(shared, count)
        assert 1 <= routed_k <= count - min(shared, count)  # torch.topk over routed experts
        p = f"model.layers.{i}."
        expected.update({p + "pre_attention_layernorm.weight": (d,),
                         p + "pre_feedforward_layernorm.weight": (d,),
                         p + "self_attn.q_proj.weight": (heads * head_dim, d),
                         p + "self_attn.k_proj.weight": (kv * head_dim, d),
                         p + "self_attn.v_proj.weight": (kv * head_dim, d),
                         p + "self_attn.o_proj.weight": (d, heads * head_dim),
                         p + "mlp.gate.weight": (count, d)})
        for e in range(count):
            expected.update({p + f"mlp.experts.{e}.gate_proj.weight": (f, d),
                             p + f"mlp.experts.{e}.up_proj.weight": (f, d),
                             p + f"mlp.experts.{e}.down_proj.weight": (d, f)})
    reader = safetensors_io.SafetensorsReader(str(hf_dir))
    reader.check(expected)
    if remote is not None:
        prefix = "" if remote == "local" else remote + "--"
        assert cfg["auto_map"]["AutoConfig"] == prefix + "configuration_emo.EmoConfig"
        assert cfg["auto_map"]["AutoModelForCausalLM"] == prefix + "modeling_emo.EmoForCausalLM"
    else:
        assert "auto_map" not in cfg
    return cfg


def test_full_model_export_loads_with_byte_token_ids_and_auto_map(tmp_path):
    config = tiny_config(vocab_size=264)
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    out = run_cli(f"--checkpoint={model_dir}", f"--to_hf={tmp_path / 'hf'}",
                  "--remote_code=my-org/EMO_code")
    assert out.returncode == 0, out.stderr
    cfg = assert_reference_loads(tmp_path / "hf", remote="my-org/EMO_code")
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["bos_token_id"]) == (0, 2, 1)
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    convert.export_hf(model_dir, str(tmp_path / "hf_local"), remote_code="local")
    assert_reference_loads(tmp_path / "hf_local", remote="local")
    convert.export_hf(model_dir, str(tmp_path / "hf_plain"))
    assert_reference_loads(tmp_path / "hf_plain")


def test_bad_remote_code_and_out_of_vocab_ids_are_refused(tmp_path):
    config = tiny_config()  # vocab 40: the byte tokenizer's ids 0, 1, 2 fit
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    assert_refused(tmp_path, lambda out: convert.export_hf(model_dir, out, remote_code="no repo"),
                   "must be 'local'")
    assert_refused(tmp_path, lambda out: convert.export_hf(
        model_dir, out, token_ids={"pad_token_id": 40}), r"pad_token_id is 40.*\[0, 40\)")
    out = run_cli(f"--checkpoint={model_dir}", f"--to_hf={tmp_path / 'hf'}",
                  "--eos_token_id=99")
    assert out.returncode != 0 and "eos_token_id is 99" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_imported_reference_keeps_its_token_ids_through_extract_and_export(tmp_path):
    from emo_jax.modular import subset as subset_lib

    cfg, tensors = hand_made_hf(vocab=300, pad_token_id=299, eos_token_id=298,
                                bos_token_id=None)
    write_hf_model(tmp_path / "hf", cfg, tensors)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    _, _, metadata = restore_model(str(tmp_path / "model"))
    assert metadata["token_ids"] == {"pad_token_id": 299, "eos_token_id": 298,
                                     "bos_token_id": None}
    convert.export_hf(str(tmp_path / "model"), str(tmp_path / "hf2"))
    back = assert_reference_loads(tmp_path / "hf2")
    assert (back["pad_token_id"], back["eos_token_id"], back["bos_token_id"]) == (299, 298, None)
    # an extracted subset of it (lazy and eager) keeps them too
    model, config, _ = restore_model(str(tmp_path / "model"))
    subset = subset_lib.make_subset([[0, 2, 4], [1, 2, 3]], config=config, model=model,
                                    method="random", data={"text": "test"})
    (tmp_path / "subset.json").write_text(json.dumps(subset.to_json()))
    for eager in ([], ["--eager"]):
        small = tmp_path / f"small{len(eager)}"
        proc = run_module("emo_jax.extract", f"--checkpoint={tmp_path / 'model'}",
                          f"--subset={tmp_path / 'subset.json'}", f"--out={small}", *eager)
        assert proc.returncode == 0, proc.stderr
        convert.export_hf(str(small), str(tmp_path / f"hf_small{len(eager)}"))
        cfg_small = assert_reference_loads(tmp_path / f"hf_small{len(eager)}")
        assert cfg_small["num_experts_per_layer"] == [4, 4]
        assert (cfg_small["pad_token_id"], cfg_small["eos_token_id"]) == (299, 298)


def test_reference_defaults_apply_to_a_config_without_token_ids(tmp_path):
    cfg, tensors = hand_made_hf(vocab=100352, d=8, heads=2, kv=1, dh=4, f=4, layers=1)
    write_hf_model(tmp_path / "hf", cfg, tensors)  # no pad/eos keys: the loader's defaults
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    convert.export_hf(str(tmp_path / "model"), str(tmp_path / "hf2"))
    back = assert_reference_loads(tmp_path / "hf2")
    assert (back["pad_token_id"], back["eos_token_id"]) == (100277, 100257)


@pytest.mark.parametrize("change,match", [
    ({"always_active_experts": [0]}, r"always_active_experts=\[0\]"),
    ({"always_active_experts_per_layer": [[1], [1]]}, "always_active_experts_per_layer="),
    ({"num_shared_experts_per_layer": [1, 2]}, r"num_shared_experts_per_layer=\[1, 2\]"),
    ({"ghost_extend_eval": True}, "ghost_extend_eval=True"),
])
def test_reference_routing_options_are_refused_on_import(tmp_path, change, match):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", {**cfg, **change}, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   match + ".*change.*routing")


def test_harmless_reference_routing_values_are_accepted(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", {**cfg, "always_active_experts": None,
                                     "num_shared_experts_per_layer": [1, 1],
                                     "ghost_extend_eval": False}, tensors)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))


# ---------------------------------------------------- tokenizers travel (issue 15, item 4)


def make_hf_tokenizer(folder):
    """A tiny byte-level BPE tokenizer.json with <pad> <s> </s> <eot>, and a
    tokenizer_config.json naming <eot> as the end of text (not the default guess </s>)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<eot>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the expert router picks a document pool"] * 50, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eot>", "bos_token": {"content": "<s>"}, "pad_token": "<pad>"}))
    return tok.get_vocab_size()


def make_sp_model(path):
    import sentencepiece as spm
    text = ["the expert router picks a document pool", "def f(x): return x"] * 40
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path),
                                   vocab_size=30, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
                                   byte_fallback=False, minloglevel=2)
    return str(path) + ".model"


def test_hf_tokenizer_json_travels_both_ways_with_its_ids(tmp_path):
    from emo_jax.modular import runtime

    vocab = make_hf_tokenizer(tmp_path / "tok")
    cfg, tensors = hand_made_hf(vocab=vocab, pad_token_id=0, eos_token_id=3, bos_token_id=1)
    write_hf_model(tmp_path / "hf", cfg, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "hf:tokenizer/tokenizer.json"  # relative: it moves
    os.rename(tmp_path / "model", tmp_path / "moved")
    _, config, _ = restore_model(str(tmp_path / "moved"))
    assert config.data.tokenizer == f"hf:{tmp_path / 'moved' / 'tokenizer' / 'tokenizer.json'}"
    tok = runtime.tokenizer_of(config)  # what generate and select use
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 3)  # <eot>: tokenizer_config.json
    convert.export_hf(str(tmp_path / "moved"), str(tmp_path / "hf2"))
    back = assert_reference_loads(tmp_path / "hf2")
    assert (back["pad_token_id"], back["eos_token_id"], back["bos_token_id"]) == (0, 3, 1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_sentencepiece_and_byte_tokenizers_travel_both_ways(tmp_path):
    from emo_jax.data.tokenizers import make_tokenizer

    sp = make_sp_model(tmp_path / "sp")
    config = tiny_config(vocab_size=48)
    config.data.tokenizer = f"sentencepiece:{sp}"
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    assert (tmp_path / "model" / "tokenizer" / "sp.model").is_file()
    os.remove(sp)  # the model directory holds its own copy
    _, restored, _ = restore_model(model_dir)
    copy = tmp_path / "model" / "tokenizer" / "sp.model"
    assert restored.data.tokenizer == f"sentencepiece:{copy}"
    out = run_cli(f"--checkpoint={model_dir}", f"--to_hf={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    cfg = assert_reference_loads(tmp_path / "hf")
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["bos_token_id"]) == (0, 2, 1)
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors",
                                                     "tokenizer.model"]
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    _, back, _ = restore_model(str(tmp_path / "back"))
    assert back.data.tokenizer == (
        f"sentencepiece:{tmp_path / 'back' / 'tokenizer' / 'tokenizer.model'}")
    text = "the expert router"
    assert (make_tokenizer(back.data.tokenizer).encode(text)
            == make_tokenizer(restored.data.tokenizer).encode(text))
    # byte: nothing to carry, and the model directory has no tokenizer/
    plain = tiny_config()
    plain_dir = save_tiny_model(tmp_path, plain, random_params(plain), name="plain")
    assert not os.path.exists(os.path.join(plain_dir, "tokenizer"))


def test_init_checkpoint_adopts_the_model_directory_tokenizer(tmp_path):
    from emo_jax.model_files import adopt_shape

    sp = make_sp_model(tmp_path / "sp")
    config = tiny_config(vocab_size=48)
    config.data.tokenizer = f"sentencepiece:{sp}"
    model_dir = save_tiny_model(tmp_path, config, random_params(config))
    fresh = tiny_config()  # data.tokenizer 'byte' (the default), vocab 40
    adopted = adopt_shape(fresh, model_dir)
    copy = tmp_path / "model" / "tokenizer" / "sp.model"
    assert adopted.data.tokenizer == f"sentencepiece:{copy}"
    assert adopted.model.vocab_size == 48
    other = tiny_config()
    other.data.tokenizer = f"sentencepiece:{sp}"  # chosen explicitly: kept
    assert adopt_shape(other, model_dir).data.tokenizer == f"sentencepiece:{sp}"


# ------------------------------ models with per-layer expert counts (issue 15, item 3)


def ragged_config(counts, shared=1, top_k=2):
    """tiny_config whose layers keep `counts` experts (shared included): moe.experts_per_layer."""
    config = tiny_config(num_experts=max(counts), shared=shared, top_k=top_k,
                         num_layers=len(counts))
    config.moe.experts_per_layer = ",".join(map(str, counts))
    return validate(config)


def ragged_params(config, seed=0):
    """random_params with the padding of the routed stacks zero, as such a model keeps it."""
    from emo_jax.model.model_config import ModelConfig

    params = random_params(config, seed)
    missing_LR = ~ModelConfig.from_config(config).existing_experts_LR()
    for kind in ("gate", "up", "down"):
        params[f"blocks.moe.w_{kind}"][missing_LR] = 0.0
    params["blocks.moe.router"].transpose(0, 2, 1)[missing_LR] = 0.0  # a view: writes through
    return params


def expert_ids(tensors, layer):
    prefix = f"model.layers.{layer}.mlp.experts."
    return {int(name[len(prefix):].split(".")[0]) for name in tensors if name.startswith(prefix)}


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_per_layer_counts_map_without_padding_and_back_bit_exact(shared):
    routed = [5, 3, 6]
    counts = [r + shared for r in routed]
    config = ragged_config(counts, shared=shared)
    params = ragged_params(config, seed=shared)
    hf_config = json.loads(json.dumps(hf.config_to_hf(config)))  # through JSON, like the file
    assert hf_config["num_experts"] == 6 + shared and hf_config["num_experts_per_layer"] == counts
    assert hf_config["num_experts_per_tok"] == 2 + shared
    tensors = hf.params_to_hf(params, config)
    assert {k: v.shape for k, v in tensors.items()} == hf.hf_shapes(config)
    for layer, r in enumerate(routed):
        assert expert_ids(tensors, layer) == set(range(r + shared))  # no padding written
        gate = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        assert gate.shape == (r + shared, 32)
        np.testing.assert_array_equal(gate[:r], params["blocks.moe.router"][layer][:, :r].T)
        if shared > 1:
            np.testing.assert_array_equal(gate[r:], params["blocks.moe.shared_router"][layer].T)
        else:
            assert not gate[r:].any()
        for e in range(r):
            np.testing.assert_array_equal(
                tensors[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"],
                params["blocks.moe.w_up"][layer, e].T)
        for j in range(shared):  # the shared experts follow this layer's routed ones
            np.testing.assert_array_equal(
                tensors[f"model.layers.{layer}.mlp.experts.{r + j}.down_proj.weight"],
                params["blocks.moe.shared_down"][layer, j].T)
    back_config, _ = hf.config_from_hf(hf_config)
    assert back_config.to_dict() == config.to_dict()
    back, notes = hf.params_from_hf(tensors, back_config)
    assert notes == []
    assert_params_identical(params, back)  # the padding comes back as exact zeros


def test_cli_round_trip_of_a_budget_extracted_model(tmp_path):
    """A model whose layers keep different numbers of experts (select --keep_total, then
    extract) exports each layer's experts without the padding, and imports back bit-exactly."""
    from emo_jax.modular import extract as extract_lib
    from emo_jax.modular import select as select_lib

    config = tiny_config(num_experts=9)
    full = random_params(config, seed=5)
    model = hf.model_from_params(config, full)
    subset = select_lib.select(model, [], None, "random", seed=4, keep_total=11)
    small, small_config, _ = extract_lib.extract(model, config, subset)
    counts = [len(ids) + 1 for ids in subset.layers]
    assert len(set(counts)) > 1, "this seed should give layers different counts"
    assert small_config.moe.experts_per_layer == ",".join(map(str, counts))
    params = hf.model_params(small)
    model_dir = save_model(str(tmp_path / "small"), small, small_config)

    out = run_cli(f"--checkpoint={model_dir}", f"--to_hf={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    cfg = assert_reference_loads(tmp_path / "hf")  # layer l: exactly counts[l] experts and rows
    assert cfg["num_experts_per_layer"] == counts and cfg["num_experts"] == max(counts)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for layer, ids in enumerate(subset.layers):
        assert expert_ids(tensors, layer) == set(range(len(ids) + 1))
        gate = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        np.testing.assert_array_equal(gate[:len(ids)], full["blocks.moe.router"][layer][:, ids].T)
        for slot, e in enumerate(ids):
            np.testing.assert_array_equal(
                tensors[f"model.layers.{layer}.mlp.experts.{slot}.gate_proj.weight"],
                full["blocks.moe.w_gate"][layer, e].T)
        np.testing.assert_array_equal(  # the shared expert right after this layer's routed ones
            tensors[f"model.layers.{layer}.mlp.experts.{len(ids)}.up_proj.weight"],
            full["blocks.moe.shared_up"][layer, 0].T)

    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    restored, back_config, _ = restore_model(str(tmp_path / "back"))
    _, saved_config, _ = restore_model(model_dir)
    assert back_config.to_dict() == saved_config.to_dict()
    assert back_config.moe.experts_per_layer == small_config.moe.experts_per_layer
    assert_params_identical(params, hf.model_params(restored))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("shared,per_layer", [(1, [4, 5]), (2, [7, 4])])
def test_reference_with_per_layer_counts_imports_padded_and_computes_alike(tmp_path, shared,
                                                                           per_layer):
    """A reference checkpoint whose layers have different numbers of experts becomes a model
    with moe.experts_per_layer and zero-padded stacks, whose logits equal the reference layout's
    (float64 NumPy) and the same padded weights with the padding masked out of routing."""
    import ml_collections
    from emo_jax.model.model_config import ModelConfig

    cfg, tensors = hand_made_hf(shared=shared, per_layer=per_layer, seed=9)
    write_hf_model(tmp_path / "hf", cfg, tensors, files=2)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    restored, config, _ = restore_model(str(tmp_path / "model"))
    assert config.moe.experts_per_layer == ",".join(map(str, per_layer))
    assert config.moe.num_experts == max(per_layer) and config.moe.top_k == 2
    assert config.moe.num_shared_experts == shared
    params = hf.model_params(restored)
    # the padded layout by hand: layer i's routed experts at rows 0..r_i-1, exact zeros after
    r_max, d, f = max(per_layer) - shared, cfg["hidden_size"], cfg["intermediate_size"]
    for i, count in enumerate(per_layer):
        r, p = count - shared, f"model.layers.{i}.mlp."
        router = np.zeros((d, r_max), np.float32)
        router[:, :r] = tensors[p + "gate.weight"][:r].T
        np.testing.assert_array_equal(params["blocks.moe.router"][i], router)
        for kind, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
            stack = np.zeros((r_max, *shape), np.float32)
            for e in range(r):
                stack[e] = tensors[p + f"experts.{e}.{kind}_proj.weight"].T
            np.testing.assert_array_equal(params[f"blocks.moe.w_{kind}"][i], stack)
            for j in range(shared):
                np.testing.assert_array_equal(params[f"blocks.moe.shared_{kind}"][i, j],
                                              tensors[p + f"experts.{r + j}.{kind}_proj.weight"].T)

    tokens = np.random.default_rng(6).integers(0, cfg["vocab_size"], 12)
    s = len(tokens)
    args = (jnp.asarray(tokens[None], jnp.int32), jnp.ones((1, s), jnp.int32),
            jnp.arange(s, dtype=jnp.int32)[None])
    logits = np.asarray(hf.model_from_params(config, params)(*args).logits_BSV[0])
    expected = numpy_hf_forward(tensors, cfg, tokens)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    uniform = ml_collections.ConfigDict(config.to_dict())
    uniform.moe.experts_per_layer = ""  # every layer padded to the largest, padding masked
    exists_LR = ModelConfig.from_config(config).existing_experts_LR()
    masked = hf.model_from_params(validate(uniform), params)(
        *args, expert_mask_LR=jnp.asarray(exists_LR)).logits_BSV[0]
    np.testing.assert_allclose(logits, np.asarray(masked), rtol=1e-5, atol=2e-6)

    convert.export_hf(str(tmp_path / "model"), str(tmp_path / "hf2"))  # back without padding
    written = assert_reference_loads(tmp_path / "hf2")
    assert written["num_experts_per_layer"] == per_layer
    assert written["num_experts"] == max(per_layer)
    back = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        if shared == 1 and name.endswith("mlp.gate.weight"):  # the one shared row: zeros
            value = np.concatenate([value[:-1], np.zeros_like(value[-1:])])
        assert np.array_equal(back[name], value), name


@pytest.mark.parametrize("counts", [[4, 2], [6, 0], [5], [5, 4.0], "6,5", [6, True]])
def test_invalid_per_layer_counts_are_refused(tmp_path, counts):
    cfg, tensors = hand_made_hf()  # 1 shared + top_k 2: each layer needs >= 3 experts
    write_hf_model(tmp_path / "hf", {**cfg, "num_experts_per_layer": counts}, tensors)
    assert_refused(tmp_path, lambda out: convert.import_hf(str(tmp_path / "hf"), out),
                   r"num_experts_per_layer is .*; it must be a list of 2 whole numbers "
                   r"\(num_hidden_layers\), one per layer, each >= 3 \(num_experts_per_tok")


def test_invalid_per_layer_counts_are_one_line_on_the_cli(tmp_path):
    cfg, tensors = hand_made_hf()
    write_hf_model(tmp_path / "hf", {**cfg, "num_experts_per_layer": [6, 2]}, tensors)
    out = run_cli(f"--from_hf={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'hf' / 'config.json'}: num_experts_per_layer is [6, 2]; it must "
        "be a list of 2 whole numbers (num_hidden_layers), one per layer, each >= 3 "
        "(num_experts_per_tok: num_shared_experts 1 + 2 routed experts per token)"]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.environ.get("EMO_REMOTE_CODE_DIR"),
                    reason="set EMO_REMOTE_CODE_DIR to a local copy of the reference's "
                    "src/hf_trust_remote_code/emo/ (not shipped here) to load in transformers")
def test_export_loads_in_transformers_with_the_reference_code(tmp_path):
    """Optional: the real loader (transformers + torch + the reference's remote code, which
    this repository cannot ship) on exports of a uniform model, a model with two shared
    experts, and a model whose layers keep different numbers of experts."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cases = {"uniform": (tiny_config(vocab_size=264), random_params),
             "two_shared": (tiny_config(vocab_size=264, shared=2), random_params),
             "per_layer": (ragged_config([7, 4, 5]), ragged_params)}
    for name, (config, make_params) in cases.items():
        config.model.vocab_size = 264
        params = make_params(validate(config), seed=3)
        model_dir = save_tiny_model(tmp_path, config, params, name=name)
        out = tmp_path / f"hf_{name}"
        convert.export_hf(model_dir, str(out), remote_code="local")
        for file in ("configuration_emo.py", "modeling_emo.py"):
            shutil.copyfile(os.path.join(os.environ["EMO_REMOTE_CODE_DIR"], file), out / file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), trust_remote_code=True, torch_dtype=torch.float32)
        tokens = (np.arange(12) * 7) % 264
        with torch.no_grad():
            theirs = model(torch.tensor(tokens[None])).logits[0].numpy()
        ours = hf.model_from_params(config, params)(
            jnp.asarray(tokens[None], jnp.int32), jnp.ones((1, 12), jnp.int32),
            jnp.arange(12, dtype=jnp.int32)[None]).logits_BSV[0]
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4,
                                   err_msg=name)
