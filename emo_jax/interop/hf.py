"""The Hugging Face EMO format (`EmoForCausalLM`, `model_type: "emo"`) as pure mappings.

Two mappings, both ways: an emo_jax config <-> a Hugging Face `config.json` dict, and emo_jax
parameters (a flat dict `'blocks.attn.wq' -> array`, see `model_params`) <-> Hugging Face tensors
(torch Linear layout `[out, in]`). No files and no torch here: `safetensors_io.py` reads and
writes the tensors, `emo_jax/convert.py` is the CLI.

The layout, per layer i (E_i = R_i routed + X shared experts, shared ones LAST):
  model.embed_tokens.weight [V, D]          <- embed [V, D]
  lm_head.weight [V, D]                     <- head [D, V] transposed (never tied)
  model.norm.weight [D]                     <- final_norm.scale
  model.layers.i.pre_attention_layernorm.weight [D]    <- blocks.attn_norm.scale[i]
  model.layers.i.pre_feedforward_layernorm.weight [D]  <- blocks.moe_norm.scale[i]
  model.layers.i.self_attn.q_proj.weight [H*Dh, D]     <- wq[i] [D, H, Dh] (head-major rows)
  model.layers.i.self_attn.{k,v}_proj.weight [KV*Dh, D] <- wk/wv[i] [D, KV, Dh]
  model.layers.i.self_attn.o_proj.weight [D, H*Dh]     <- wo[i] [H, Dh, D]
  model.layers.i.mlp.gate.weight [E_i, D]   <- router[i, :, :R_i] transposed, then the X shared
                                               rows: shared_router[i] [D, X] transposed (X > 1)
  model.layers.i.mlp.experts.e.{gate,up}_proj.weight [F, D], down_proj.weight [D, F]
        e < R_i: routed expert e (w_gate/w_up/w_down[i, e]); e >= R_i: shared expert e - R_i.

E_i is num_experts in every layer, or the reference's `num_experts_per_layer[i]` for a model
whose layers keep different numbers of experts: emo_jax's `moe.experts_per_layer`, whose stacks
are padded to R = max R_i with zeros (masked out of routing). Export writes each layer's R_i
routed experts and gate rows only, without the padding; import pads them again with zeros.

The router rows of shared experts: the Hugging Face implementation takes one softmax over the
routed experts' logits (top-k of those) and another over the X shared experts' logits, which
weights each shared expert; emo_jax's `shared_router` is exactly those rows, carried both ways.
With one shared expert that softmax is 1.0 whatever its row holds, so emo_jax keeps no row:
export writes zeros there, import drops it (and reports it when it was not zero). RoPE is
rotate-half in both, so q/k need no
permutation; GQA maps query head h to key/value head h // (H / KV) in both.

Glossary: V vocabulary, D d_model, L layers, H query heads, KV key/value heads, Dh head dim,
E experts per layer (shared included), R routed, X shared, F expert hidden; _i: of layer i.
"""

from __future__ import annotations

import copy
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from emo_jax.config import ConfigError, default_config, validate
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer

MODEL_TYPE = "emo"
ARCHITECTURE = "EmoForCausalLM"
EXTRA_KEY = "emo_jax"  # config.json key holding the emo_jax config and lineage (ignored by HF)
FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Reference EMO pool range (docs/METHOD.md §5: 8..128 with 128 experts) used for a model that
# carries no emo_jax training settings (a released Hugging Face model).
_REFERENCE_POOL_MIN = 8

# The special token ids of config.json, and the reference loader's defaults when one is absent.
TOKEN_ID_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id")
REFERENCE_TOKEN_ID_DEFAULTS = {"pad_token_id": 100277, "eos_token_id": 100257,
                               "bos_token_id": None}
# auto_map entries of the reference's remote code (module.Class in its folder).
_AUTO_MAP = {"AutoConfig": "configuration_emo.EmoConfig",
             "AutoModel": "modeling_emo.EmoModel",
             "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"}

_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rope_theta", "rms_norm_eps", "num_experts", "num_experts_per_tok",
    "num_shared_experts",
)


class InteropError(ValueError):
    """A model or file cannot be converted; the message names the key, tensor or file."""


# --------------------------------------------------------------------------------------------
# Configs


def experts_per_layer(config) -> list[int]:
    """Experts kept in each layer (shared included): `moe.experts_per_layer`, or num_experts in
    every layer (ModelConfig.layer_experts)."""
    return list(ModelConfig.of(config).layer_experts)


def check_token_ids(token_ids: Mapping, vocab_size: int, where: str = "") -> dict:
    """{pad/eos/bos_token_id: int or None} checked as the reference loader needs them: whole
    numbers in [0, vocab_size) (the embedding's padding_idx must be a row of it), or None;
    eos_token_id may also be a list of such ids. Raises InteropError naming the bad one."""
    out = {}
    for key in TOKEN_ID_KEYS:
        value = token_ids.get(key)
        values = value if isinstance(value, list) and key == "eos_token_id" else [value]
        for v in values:
            _refuse(v is not None and not (_is_int(v) and 0 <= v < vocab_size),
                    f"{where}{key} is {value!r}, but it must be a token id in "
                    f"[0, {vocab_size}) (vocab_size) or null")
        out[key] = value
    return out


def remote_code_map(remote_code: str) -> dict:
    """The `auto_map` of config.json pointing at the reference's remote code
    (configuration_emo.py / modeling_emo.py of allenai/EMO, src/hf_trust_remote_code/emo/).

    'local': the files sit next to config.json (the user copies them there);
    'ORG/REPO': a Hugging Face hub repository holding them ("ORG/REPO--module.Class").
    """
    if remote_code == "local":
        prefix = ""
    else:
        _refuse(not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", remote_code or ""),
                f"remote code {remote_code!r} must be 'local' (configuration_emo.py and "
                "modeling_emo.py placed next to config.json) or a hub repository ORG/REPO")
        prefix = remote_code + "--"
    return {key: prefix + target for key, target in _AUTO_MAP.items()}


def config_to_hf(config, *, dtype: str = "float32", subset: bool = False,
                 lineage: Mapping | None = None, token_ids: Mapping | None = None,
                 remote_code: str | None = None) -> dict:
    """The Hugging Face config.json dict of an emo_jax config.

    Every key the reference's `EmoConfig.__init__` reads is written, so none of its defaults
    (e.g. pad_token_id 100277, eos_token_id 100257) applies.
    subset: the model is an extracted subset; `num_experts_per_layer` is written then, and
    always for a model with `moe.experts_per_layer` (its per-layer counts; num_experts is the
    largest).
    lineage: JSON-able facts stored under the `emo_jax` key (source checkpoint, subset, ...).
    token_ids: {pad_token_id, eos_token_id, bos_token_id}, each within the vocabulary or None
    (missing: None).
    remote_code: 'local' or 'ORG/REPO': writes an `auto_map` (`remote_code_map`).
    Raises InteropError naming the key when the model cannot be expressed.
    """
    m, e = config.model, config.moe
    if m.qk_norm:
        raise InteropError("model.qk_norm is True, but the Hugging Face EMO format has no QK-norm "
                           "(no q_norm/k_norm weights): this model cannot be exported")
    if dtype not in DTYPES:
        raise InteropError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    ids = check_token_ids(token_ids or {}, m.vocab_size, "export: ")
    auto_map = remote_code_map(remote_code) if remote_code else None
    hf = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": e.expert_hidden,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_theta": float(m.rope_theta),
        "rope_scaling": None,
        "rms_norm_eps": float(m.norm_eps),
        "max_position_embeddings": config.data.seq_len,
        "num_experts": e.num_experts,
        "num_experts_per_tok": e.top_k + e.num_shared_experts,
        "num_shared_experts": e.num_shared_experts,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        **ids,
        # the rest of what EmoConfig reads, at the values that route as emo_jax does
        "num_shared_experts_per_layer": None,
        "always_active_experts": None,
        "always_active_experts_per_layer": None,
        "dense_intermediate_size": None,
        "dense_mlp_bias": False,
        "ghost_extend_eval": False,
        "attention_dropout": 0.0,
        "initializer_range": float(m.init_std),
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": float(e.balance_weight),
    }
    if subset or e.experts_per_layer:  # absent otherwise: every layer has num_experts
        hf["num_experts_per_layer"] = experts_per_layer(config)
    if auto_map:
        hf["auto_map"] = auto_map
    hf[EXTRA_KEY] = {
        "format_version": FORMAT_VERSION,
        "note": "emo_jax settings (training-only keys such as the document pool range); "
                "ignored by transformers. mlp.gate rows of shared experts (the last "
                "num_shared_experts rows) weight them by their own softmax; with one shared "
                "expert its row is zeros (a softmax over one logit is 1.0).",
        "config": config.to_dict(),
        **({"lineage": dict(lineage)} if lineage else {}),
    }
    return hf


def _refuse(condition: bool, message: str):
    if condition:
        raise InteropError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hf_experts_per_layer(hf: dict, name: str, shared: int, top_k: int) -> list[int]:
    """E of each layer (shared included): `num_experts_per_layer`, or num_experts in every
    layer. Each must leave top_k routed experts beside the shared ones (one line naming the key
    and the valid range otherwise)."""
    layers = hf["num_hidden_layers"]
    counts = hf.get("num_experts_per_layer")
    if counts is None:
        return [hf["num_experts"]] * layers
    low = shared + top_k
    _refuse(not isinstance(counts, list) or len(counts) != layers
            or not all(_is_int(c) and c >= low for c in counts),
            f"{name}: num_experts_per_layer is {counts!r}; it must be a list of {layers} whole "
            f"numbers (num_hidden_layers), one per layer, each >= {low} (num_experts_per_tok: "
            f"num_shared_experts {shared} + {top_k} routed experts per token)")
    return list(counts)


def _layer_experts_text(counts: list[int], stored) -> str:
    """`moe.experts_per_layer` of these per-layer counts: '' when uniform (unless the stored
    emo_jax config wrote the same counts out), else 'n0,n1,...'."""
    try:
        if stored and [int(n) for n in str(stored).split(",")] == counts:
            return str(stored)
    except ValueError:
        pass
    return "" if len(set(counts)) == 1 else ",".join(map(str, counts))


def _refuse_reference_routing(hf: Mapping, name: str, shared: int):
    """Refuses the reference's routing options that emo_jax does not implement, in one line
    naming them: always-active experts, per-layer shared counts other than num_shared_experts
    everywhere, the ghost-expert evaluation."""
    layers = hf["num_hidden_layers"]
    found = []
    for key in ("always_active_experts", "always_active_experts_per_layer"):
        value = hf.get(key)
        if value is not None and value != [] and value != [[]] * layers:
            found.append(f"{key}={value!r}")
    per_layer = hf.get("num_shared_experts_per_layer")
    if per_layer is not None and per_layer != [shared] * layers:
        found.append(f"num_shared_experts_per_layer={per_layer!r}")
    ghost = hf.get("ghost_extend_eval", False)
    if ghost is True or str(ghost).strip().lower() in ("true", "1", "yes"):
        found.append(f"ghost_extend_eval={ghost!r}")
    _refuse(bool(found), f"{name}: {'; '.join(found)} change(s) the reference's routing, which "
            f"emo_jax does not implement (it routes top-k over the routed experts plus "
            f"num_shared_experts={shared} shared ones in every layer)")


def token_ids_from_hf(hf: Mapping) -> dict:
    """{pad/eos/bos_token_id} a Hugging Face EMO config.json gives its model: its own values, or
    the reference loader's defaults for the keys it lacks; ids outside the vocabulary (which
    the reference cannot load either) are left out."""
    ids = {key: hf.get(key, REFERENCE_TOKEN_ID_DEFAULTS[key]) for key in TOKEN_ID_KEYS}
    out = {}
    for key, value in ids.items():
        try:
            out[key] = check_token_ids({key: value}, hf["vocab_size"])[key]
        except InteropError:
            continue
    return out


def config_from_hf(hf: Mapping, *, name: str = "config.json"):
    """(emo_jax config, notes) of a Hugging Face EMO config.json dict.

    Architecture keys come from the Hugging Face keys. Everything else (pool range, losses,
    data, ...) comes from the `emo_jax` key when the file was written by emo_jax, else from the
    defaults with the reference pool range. Raises InteropError naming what differs when the
    model cannot be expressed in emo_jax.
    """
    hf = dict(hf)
    notes = []
    _refuse(hf.get("model_type") != MODEL_TYPE,
            f"{name}: model_type is {hf.get('model_type')!r}; only the Hugging Face EMO format "
            f"(model_type {MODEL_TYPE!r}, {ARCHITECTURE}) can be imported")
    missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
    _refuse(bool(missing), f"{name}: missing key(s) {', '.join(missing)}")
    for key in _REQUIRED_HF_KEYS:
        ok = (isinstance(hf[key], (int, float)) and not isinstance(hf[key], bool)
              if key in ("rope_theta", "rms_norm_eps") else _is_int(hf[key]))
        _refuse(not ok, f"{name}: {key} is {hf[key]!r}; expected a "
                f"{'number' if key in ('rope_theta', 'rms_norm_eps') else 'whole number'}")
    _refuse(bool(hf.get("tie_word_embeddings", False)),
            f"{name}: tie_word_embeddings is true, but emo_jax models have an untied output head")
    _refuse(bool(hf.get("norm_topk_prob", False)),
            f"{name}: norm_topk_prob is true, but EMO routing does not renormalise the top-k "
            "weights")
    for key in ("qk_norm", "use_qk_norm", "attention_bias", "mlp_bias", "use_sliding_window"):
        _refuse(bool(hf.get(key, False)),
                f"{name}: {key} is true, which emo_jax models do not have")
    _refuse(hf.get("hidden_act", "silu") != "silu",
            f"{name}: hidden_act is {hf.get('hidden_act')!r}; emo_jax experts are SwiGLU ('silu')")
    _refuse(hf.get("rope_scaling") is not None,
            f"{name}: rope_scaling is {hf.get('rope_scaling')!r}; emo_jax has plain RoPE only "
            "(rope_scaling null)")

    shared = hf["num_shared_experts"]
    _refuse_reference_routing(hf, name, shared)
    top_k = hf["num_experts_per_tok"] - shared  # HF counts the shared experts as active too
    _refuse(top_k < 1, f"{name}: num_experts_per_tok ({hf['num_experts_per_tok']}) must exceed "
            f"num_shared_experts ({shared}): it counts the shared experts too")
    counts = _hf_experts_per_layer(hf, name, shared, top_k)
    num_experts = max(counts)  # the stacks are padded to the largest layer
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    _refuse(head_dim is not None and not _is_int(head_dim),
            f"{name}: head_dim is {head_dim!r}; expected a whole number")
    if head_dim is None:
        _refuse(hidden % heads != 0, f"{name}: hidden_size ({hidden}) is not a multiple of "
                f"num_attention_heads ({heads}) and no head_dim is given")
        head_dim = hidden // heads

    config = default_config()
    extra = hf.get(EXTRA_KEY)
    if isinstance(extra, dict) and isinstance(extra.get("config"), dict):
        ignored = _overlay(config, extra["config"])
        if ignored:
            notes.append(f"ignored emo_jax config keys unknown to this version: {ignored}")
    else:
        low, high = min(counts) - shared, num_experts - shared
        routed = f"{high}" if low == high else f"{low}..{high} (per layer)"
        config.moe.pool_max = max(num_experts, top_k)
        config.moe.pool_min = min(max(top_k, _REFERENCE_POOL_MIN), config.moe.pool_max)
        config.moe.eval_pool = 0
        if "max_position_embeddings" in hf:
            config.data.seq_len = int(hf["max_position_embeddings"])
        notes.append(f"no emo_jax settings in {name}: training-only keys are defaults, with the "
                     f"reference document pool range clipped to this model: "
                     f"{config.moe.pool_min}..{config.moe.pool_max} ({routed} routed experts); "
                     "to continue a standard MoE, train with --config.moe.pool=none")
    m, e = config.model, config.moe
    m.vocab_size, m.d_model = int(hf["vocab_size"]), int(hidden)
    m.num_layers, m.num_heads = int(hf["num_hidden_layers"]), int(heads)
    m.num_kv_heads, m.head_dim = int(hf["num_key_value_heads"]), int(head_dim)
    m.rope_theta, m.norm_eps = float(hf["rope_theta"]), float(hf["rms_norm_eps"])
    m.qk_norm = False
    e.num_experts, e.num_shared_experts = int(num_experts), int(shared)
    e.experts_per_layer = _layer_experts_text(counts, e.experts_per_layer)
    e.top_k, e.expert_hidden = int(top_k), int(hf["intermediate_size"])
    try:
        validate(config)
    except ConfigError as err:
        raise InteropError(f"{name} gives an invalid emo_jax config: {err}") from None
    return config, notes


def _overlay(config, stored: Mapping, prefix: str = "") -> list[str]:
    """Copies stored values onto config where the key exists; returns the keys it ignored."""
    ignored = []
    for key, value in stored.items():
        dotted = f"{prefix}{key}"
        if key not in config:
            ignored.append(dotted)
        elif isinstance(config[key], ml_collections.ConfigDict):
            if isinstance(value, Mapping):
                ignored += _overlay(config[key], value, dotted + ".")
            else:
                ignored.append(dotted)
        else:
            try:
                config[key] = value
            except (TypeError, ValueError):
                ignored.append(dotted)
    return ignored


# --------------------------------------------------------------------------------------------
# Parameters


def _flat_params(model):
    """[(dotted name, Param variable)] of a model."""
    return [(".".join(map(str, path)), var)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def model_params(model, *, host: bool = True) -> dict:
    """Flat {'blocks.attn.wq': array, ...} of a model's parameters: host NumPy arrays, or with
    host=False the model's own (device) arrays, which `export_tensors` slices per tensor so the
    model is never copied to the host whole."""
    return {name: np.asarray(var[...]) if host else var[...] for name, var in _flat_params(model)}


def _abstract_model(config):
    return nnx.eval_shape(lambda: Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0)))


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Flat {'blocks.attn.wq': shape, ...} of a config's parameters (nothing allocated)."""
    return {name: tuple(var.shape) for name, var in _flat_params(_abstract_model(config))}


def model_from_params(config, params: dict[str, np.ndarray], *, consume: bool = False):
    """A Transformer holding exactly `params` (no random initialisation of the weights).

    consume: pop each array from `params` once it is on the device (halves the peak memory).
    """
    model = _abstract_model(config)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in params:
            raise InteropError(f"parameter {key} is missing")
        value = params.pop(key) if consume else params[key]
        if tuple(value.shape) != tuple(var.shape):
            raise InteropError(f"parameter {key} has shape {tuple(value.shape)}, the config "
                               f"needs {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(model, state)
    return model


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of this config and its shape, in file order."""
    m, e = config.model, config.moe
    d, v, f = m.d_model, m.vocab_size, e.expert_hidden
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i, experts in enumerate(experts_per_layer(config)):
        p = f"model.layers.{i}."
        shapes[p + "pre_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate.weight"] = (experts, d)
        for x in range(experts):
            shapes[p + f"mlp.experts.{x}.gate_proj.weight"] = (f, d)
            shapes[p + f"mlp.experts.{x}.up_proj.weight"] = (f, d)
            shapes[p + f"mlp.experts.{x}.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def _parse(name: str):
    """(layer or None, expert or None, leaf) of a Hugging Face tensor name."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None, None, name
    layer, rest = int(parts[2]), parts[3:]
    if rest[:2] == ["mlp", "experts"]:
        return layer, int(rest[2]), ".".join(rest[3:])
    return layer, None, ".".join(rest)


def export_tensors(params: Mapping, config) -> dict[str, Callable[[], np.ndarray]]:
    """{HF name: () -> float32 [out, in] array}: computed on demand, so a writer holds one shard.

    `params` may hold NumPy or JAX arrays (`model_params(model, host=False)`). Layer i gets
    its R_i routed experts only (the padding of a model with per-layer counts is left out)."""
    routed_L = ModelConfig.of(config).layer_routed()

    def tensor(name):
        layer, expert, leaf = _parse(name)
        if layer is None:
            return {"model.embed_tokens.weight": lambda: params["embed"],
                    "model.norm.weight": lambda: params["final_norm.scale"],
                    "lm_head.weight": lambda: params["head"].T}[name]()
        r = routed_L[layer]
        if expert is not None:
            kind = {"gate_proj.weight": "gate", "up_proj.weight": "up",
                    "down_proj.weight": "down"}[leaf]
            if expert < r:
                return params[f"blocks.moe.w_{kind}"][layer, expert].T
            return params[f"blocks.moe.shared_{kind}"][layer, expert - r].T
        if leaf == "pre_attention_layernorm.weight":
            return params["blocks.attn_norm.scale"][layer]
        if leaf == "pre_feedforward_layernorm.weight":
            return params["blocks.moe_norm.scale"][layer]
        if leaf == "mlp.gate.weight":
            router_RD = params["blocks.moe.router"][layer][:, :r].T
            if config.moe.num_shared_experts > 1:
                shared_XD = params["blocks.moe.shared_router"][layer].T
            else:
                shared_XD = np.zeros((config.moe.num_shared_experts, router_RD.shape[1]),
                                     np.float32)
            return np.concatenate([np.asarray(router_RD, np.float32), shared_XD], axis=0)
        proj = leaf.split(".")[1]  # self_attn.q_proj.weight -> q_proj
        w = params[f"blocks.attn.w{proj[0]}"][layer]
        if proj == "o_proj":
            return w.reshape(-1, w.shape[-1]).T  # [H, Dh, D] -> [D, H*Dh]
        return w.reshape(w.shape[0], -1).T  # [D, H, Dh] -> [H*Dh, D]

    return {name: (lambda name=name: np.ascontiguousarray(np.asarray(tensor(name)), np.float32))
            for name in hf_shapes(config)}


def params_to_hf(params: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """All Hugging Face tensors of a model at once (float32); for small models and tests."""
    return {name: get() for name, get in export_tensors(params, config).items()}


def params_from_hf(tensors: Mapping[str, np.ndarray], config):
    """(flat emo_jax params in float32, notes) from Hugging Face tensors (any float dtype).

    `tensors` may load lazily (a safetensors reader); names and shapes must already be checked
    against `hf_shapes(config)`. Stacked parameters are filled in place, one tensor at a time, so
    the peak memory is the model plus one tensor. The shared experts' router rows become
    `shared_router`; a single shared expert's row is dropped (its softmax is 1.0 whatever it
    holds): notes say so when it was not zero. Layer i's R_i routed experts fill rows
    0..R_i-1 of the stacks; the rest (the padding of per-layer counts) stays zero.
    """
    m, e = config.model, config.moe
    x = e.num_shared_experts
    routed_L = ModelConfig.of(config).layer_routed()
    d, h, kv, dh = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    params = {key: np.zeros(shape, np.float32) for key, shape in param_shapes(config).items()}

    def get(name):
        return np.asarray(tensors[name]).astype(np.float32)

    params["embed"][...] = get("model.embed_tokens.weight")
    params["head"][...] = get("lm_head.weight").T
    params["final_norm.scale"][...] = get("model.norm.weight")
    dropped = []
    for i, r in enumerate(routed_L):
        p = f"model.layers.{i}."
        params["blocks.attn_norm.scale"][i] = get(p + "pre_attention_layernorm.weight")
        params["blocks.moe_norm.scale"][i] = get(p + "pre_feedforward_layernorm.weight")
        params["blocks.attn.wq"][i] = get(p + "self_attn.q_proj.weight").T.reshape(d, h, dh)
        params["blocks.attn.wk"][i] = get(p + "self_attn.k_proj.weight").T.reshape(d, kv, dh)
        params["blocks.attn.wv"][i] = get(p + "self_attn.v_proj.weight").T.reshape(d, kv, dh)
        params["blocks.attn.wo"][i] = get(p + "self_attn.o_proj.weight").T.reshape(h, dh, d)
        gate_ED = get(p + "mlp.gate.weight")
        params["blocks.moe.router"][i, :, :r] = gate_ED[:r].T
        if x > 1:
            params["blocks.moe.shared_router"][i] = gate_ED[r:].T
        elif x and np.any(gate_ED[r:] != 0):
            dropped.append((i, float(np.max(np.abs(gate_ED[r:])))))
        for j in range(r + x):
            target, slot = ("w", j) if j < r else ("shared", j - r)
            for kind in ("gate", "up", "down"):
                params[f"blocks.moe.{target}_{kind}"][i, slot] = get(
                    p + f"mlp.experts.{j}.{kind}_proj.weight").T
    notes = []
    if dropped:
        notes.append("dropped the nonzero router row of the one shared expert (its weight is "
                     "the softmax over its one logit, 1.0 whatever the row holds), max |w| per "
                     f"layer: {dropped}")
    return params, notes


def hf_config_copy(hf: Mapping) -> dict:
    """The Hugging Face config without the emo_jax key (for lineage records)."""
    out = copy.deepcopy(dict(hf))
    out.pop(EXTRA_KEY, None)
    return out
