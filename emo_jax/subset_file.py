"""The subset file: which experts of every MoE layer a task keeps, as a small JSON file.

A subset names, per layer, the kept *routed* experts by their router column (0..R-1); the
shared experts are always kept and never listed. `keep` (K) counts the shared experts, as in
the paper (16 of 128 experts is 12.5%), so every layer lists K - S routed ids. A subset chosen
under a total budget (`select --keep_total`) keeps different numbers per layer: `keep` is then
the list of per-layer counts K_l (shared included), and layer l lists K_l - S ids; extracting
it gives a model with `moe.experts_per_layer`. The file also
records how the subset was chosen (method, data) and the shape of the model it belongs to, so
that a subset of another model is refused instead of silently selecting the wrong weights.

File format (JSON, `format: "emo_jax.subset"`, `format_version: 1`):

    {
      "format": "emo_jax.subset", "format_version": 1,
      "keep": 16,                      # K: experts per layer, shared ones included (or a
                                       # list [K_0, K_1, ...]: per layer)
      "shared_experts": 1,             # S: always kept (not listed in "layers")
      "layers": [[2, 9, ...], ...],    # per layer: the K - S kept routed ids, ascending
      "method": "layerwise",           # layerwise | global | easy_ep | random | compose | ...
      "data": {...},                   # what chose them: source, documents, tokens, ...
      "model": {"shape": {...},        # config keys deciding parameter shapes (refused if not
                                       # equal to the model's)
                "router_digest": "..."},  # of the router weights: a mismatch only warns
      "scores": [[...R floats...], ...],  # optional: the per-layer scores behind the choice
      "components": [...],             # compose only: method/keep/data of each input
      "filled": [[...], ...]           # compose only: per layer, ids added to even out layers
    }

Here: the `Subset` record, reading (`load`, `from_json`: validated), writing (`save`, `dumps`)
and the check against a model (`Subset.check_model`). Choosing and composing subsets is
emo_jax/modular/ (select.py, subset.py); module fine-tuning (emo_jax/train/modules.py) reads
subset files through this module. Nothing here changes a model: it reads and writes JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from absl import logging

from emo_jax import storage
from emo_jax.config import SHAPE_KEYS, ConfigError
from emo_jax.model.model_config import ModelConfig, expert_counts

FORMAT = "emo_jax.subset"
FORMAT_VERSION = 1


class SubsetError(ConfigError):
    """A subset file or request is invalid; the message names it and what would be valid."""


def model_shape(config) -> dict:
    """{'model.d_model': 128, ...}: the shape keys of a run config or a ModelConfig."""
    model_config = ModelConfig.of(config)
    return {key: getattr(model_config, key.split(".")[1]) for key in SHAPE_KEYS}


def router_digest(model) -> str:
    """A short hash of the router weights: tells a model from another of the same shape."""
    router = np.asarray(model.blocks.moe.router[...], np.float32)
    return hashlib.sha256(np.ascontiguousarray(router).tobytes()).hexdigest()[:16]


@dataclasses.dataclass
class Subset:
    """Kept routed experts per layer, and where they came from (see the module docstring)."""

    layers: list  # per layer, the kept routed expert ids (ascending)
    keep: int | list  # K, shared experts included; a list: K_l per layer
    shared_experts: int  # S
    method: str
    data: dict
    model: dict  # {'shape': {...}, 'router_digest': str | None}
    scores: list | None = None  # per layer, R floats
    components: list | None = None  # compose: the inputs' method, keep and data
    filled: list | None = None  # compose: per layer, ids added to even out the layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def keep_per_layer(self) -> list[int]:
        """K_l of every layer (shared experts included)."""
        return [len(ids) + self.shared_experts for ids in self.layers]

    @property
    def routed_experts(self) -> int:
        return self.model["shape"]["moe.num_experts"] - self.shared_experts

    def padded_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(int [L, Kmax], bool [L, Kmax]): each layer's kept routed ids padded to the largest
        layer's count by repeating its first id, and which entries are real. An extracted model
        stores layer l's experts at rows 0..K_l - S - 1 and zeros after them."""
        width = max(len(ids) for ids in self.layers)
        idx_LK = np.array([ids + [ids[0]] * (width - len(ids)) for ids in self.layers], np.int64)
        valid_LK = np.arange(width)[None, :] < np.array([len(i) for i in self.layers])[:, None]
        return idx_LK, valid_LK

    def mask(self) -> np.ndarray:
        """bool [L, R]: the routed experts kept (what `expert_mask_LR` of the model takes)."""
        mask_LR = np.zeros((self.num_layers, self.routed_experts), bool)
        for layer, ids in enumerate(self.layers):
            mask_LR[layer, ids] = True
        return mask_LR

    def to_json(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "keep": self.keep,
               "shared_experts": self.shared_experts, "layers": self.layers,
               "method": self.method, "data": self.data, "model": self.model}
        for name in ("scores", "components", "filled"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def check_model(self, config, model=None, *, where: str = "the subset") -> None:
        """Refuses a subset of a model of another shape; warns on another router digest."""
        mine, theirs = model_shape(config), self.model.get("shape", {})
        diff = [f"{k}={theirs.get(k)!r} there but {v!r} here" for k, v in mine.items()
                if theirs.get(k) != v]
        if diff:
            raise SubsetError(f"{where} was chosen for another model ({', '.join(diff)}); "
                              "select a subset with this checkpoint")
        digest = self.model.get("router_digest")
        if model is not None and digest and digest != router_digest(model):
            logging.warning("%s was chosen on a model with other router weights (digest %s, "
                            "this model %s): same shape, but maybe another checkpoint", where,
                            digest, router_digest(model))


def _fail(where: str, problem: str):
    raise SubsetError(f"{where} is not a valid subset file: {problem}")


def from_json(obj: dict, *, where: str = "subset") -> Subset:
    """Validates a subset dict (as loaded from JSON) and returns it as a Subset."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        _fail(where, f"'format' must be {FORMAT!r}")
    if obj.get("format_version") != FORMAT_VERSION:
        _fail(where, f"'format_version' is {obj.get('format_version')!r}; this emo_jax reads "
                     f"{FORMAT_VERSION}")
    for key in ("keep", "shared_experts", "layers", "method", "model"):
        if key not in obj:
            _fail(where, f"the key '{key}' is missing")
    shape = obj["model"].get("shape") if isinstance(obj["model"], dict) else None
    if isinstance(shape, dict):  # files written before per-layer expert counts existed
        shape.setdefault("moe.experts_per_layer", "")
    if not isinstance(shape, dict) or any(k not in shape for k in SHAPE_KEYS):
        _fail(where, f"'model.shape' must hold {', '.join(SHAPE_KEYS)}")
    layers, keep, shared = obj["layers"], obj["keep"], obj["shared_experts"]
    routed = shape["moe.num_experts"] - shape["moe.num_shared_experts"]
    if shared != shape["moe.num_shared_experts"]:
        _fail(where, f"'shared_experts' is {shared!r} but the model has "
                     f"{shape['moe.num_shared_experts']}")
    if not isinstance(layers, list) or len(layers) != shape["model.num_layers"]:
        _fail(where, f"'layers' must list the kept experts of each of the "
                     f"{shape['model.num_layers']} layers")
    try:
        layer_routed = [n - shared for n in expert_counts(
            shape["moe.experts_per_layer"], shape["moe.num_experts"], shape["model.num_layers"])]
        if len(layer_routed) != len(layers):
            raise ValueError("one count per layer")
    except (AttributeError, TypeError, ValueError):
        _fail(where, f"'model.shape' has an invalid moe.experts_per_layer "
                     f"{shape.get('moe.experts_per_layer')!r}")
    keeps = keep if isinstance(keep, list) else [keep] * len(layers)
    if len(keeps) != len(layers) or not all(
            isinstance(k, int) and not isinstance(k, bool) and shared < k <= r + shared
            for k, r in zip(keeps, layer_routed)):
        _fail(where, f"'keep' is {keep!r}; it must be a number, or a list of one per layer, in "
                     f"[{shared + 1}, the layer's experts] (the model's: "
                     f"{[r + shared for r in layer_routed]})")
    for layer, ids in enumerate(layers):
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in ids):
            _fail(where, f"layer {layer}: the kept experts must be a list of integers")
        if len(ids) != keeps[layer] - shared:
            _fail(where, f"layer {layer} lists {len(ids)} routed experts; 'keep' "
                         f"{keeps[layer]} minus {shared} shared means {keeps[layer] - shared}")
        top = layer_routed[layer]
        if sorted(set(ids)) != ids or (ids and not 0 <= ids[0] <= ids[-1] < top):
            _fail(where, f"layer {layer}: ids must be ascending, distinct and in [0, {top})")
    scores = obj.get("scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(layers) or
                               any(not isinstance(s, list) or len(s) != routed for s in scores)):
        _fail(where, f"'scores' must hold {routed} numbers for each layer")
    return Subset(layers=layers, keep=keep, shared_experts=shared, method=str(obj["method"]),
                  data=dict(obj.get("data") or {}), model=obj["model"], scores=scores,
                  components=obj.get("components"), filled=obj.get("filled"))


def load(path: str) -> Subset:
    """Reads and validates a subset file; SubsetError for a missing or malformed one."""
    if not storage.isfile(path):
        raise SubsetError(f"subset file '{path}' does not exist")
    try:
        obj = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SubsetError(f"subset file '{path}' is not valid JSON ({err})") from None
    return from_json(obj, where=f"subset file '{path}'")


def save(subset: Subset, path: str) -> str:
    """Writes the subset as JSON (atomically: a temporary file renamed into place, or one
    object on object storage)."""
    storage.write_text(path, dumps(subset))
    return path


def dumps(subset: Subset) -> str:
    """The file text: indented JSON with one line per layer for the per-layer lists."""
    obj = subset.to_json()
    if obj.get("scores") is not None:
        obj["scores"] = [[float(f"{x:.8g}") for x in row] for row in obj["scores"]]
    parts = []
    for key, value in obj.items():
        if key in ("layers", "scores", "filled"):
            text = "[\n" + ",\n".join("    " + json.dumps(row) for row in value) + "\n  ]"
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"
