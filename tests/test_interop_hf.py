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
    assert not gate[5:].any()  # shared experts' router rows: zeros, last
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
    cfg, tensors = hand_made_hf()
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

        y = np.zeros_like(x)
        for tok in range(s):
            logits = gate_w[:routed] @ x[tok]
            soft = np.exp(logits - logits.max())
            soft /= soft.sum()
            for e in np.argsort(-soft)[:top]:
                y[tok] += soft[e] * expert(e, x[tok])  # not renormalised
            for e in range(routed, routed + shared):
                y[tok] += expert(e, x[tok])  # weight 1
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
                 f=12, vocab=50, seed=0, **extra):
    """A config.json dict and random tensors in the HF layout, made without emo_jax."""
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
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "pre_attention_layernorm.weight": norm(),
                  p + "pre_feedforward_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": r(heads * dh, d),
                  p + "self_attn.k_proj.weight": r(kv * dh, d),
                  p + "self_attn.v_proj.weight": r(kv * dh, d),
                  p + "self_attn.o_proj.weight": r(d, heads * dh),
                  p + "mlp.gate.weight": r(num_experts, d)})  # shared rows nonzero: unused
        for e in range(num_experts):
            t.update({p + f"mlp.experts.{e}.gate_proj.weight": r(f, d),
                      p + f"mlp.experts.{e}.up_proj.weight": r(f, d),
                      p + f"mlp.experts.{e}.down_proj.weight": r(d, f)})
    return cfg, t


@pytest.mark.parametrize("shared,kv", [(1, 2), (2, 4)])
def test_imported_model_matches_numpy_forward_of_hf_layout(tmp_path, shared, kv):

    cfg, tensors = hand_made_hf(num_experts=5 + shared, shared=shared, kv=kv, seed=shared)
    write_hf_model(tmp_path / "hf", cfg, tensors, files=2)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "model"))
    restored, config, metadata = restore_model(str(tmp_path / "model"))
    assert config.moe.eval_pool == 0 and config.moe.top_k == 2
    assert config.moe.num_experts == 5 + shared and config.moe.num_shared_experts == shared
    assert any("dropped nonzero router rows" in n for n in metadata["notes"])
    model = hf.model_from_params(config, hf.model_params(restored))  # one device, host arrays

    tokens = np.random.default_rng(5).integers(0, cfg["vocab_size"], 12)
    s = len(tokens)
    logits = model(jnp.asarray(tokens[None], jnp.int32), jnp.ones((1, s), jnp.int32),
                   jnp.arange(s, dtype=jnp.int32)[None]).logits_BSV
    expected = numpy_hf_forward(tensors, cfg, tokens)
    assert np.abs(expected).max() > 1.0  # logits large enough for the comparison to mean much
    print("max |emo_jax - numpy|:", np.abs(np.asarray(logits[0]) - expected).max())
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=1e-4, atol=1e-4)


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
    ({"num_experts_per_layer": [6, 4]},
     r"num_experts_per_layer differs across layers \(\[6, 4\]\)"),
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
