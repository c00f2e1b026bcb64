"""Transplanting expert modules: a base checkpoint with some experts taken from other ones.

`compose(base, takes, out)` starts from every array of `base` and, for each take (a source
checkpoint and a subset file), overwrites per layer the subset's routed experts (their
`w_gate`, `w_up`, `w_down` rows) and their router columns with the source's. Typical use:
fine-tune one module per team (`python -m emo_jax.train --trainable=legal.json ...`), then
put the modules together in one model. Everything not claimed (attention, embeddings, norms,
head, shared experts, the other experts and router columns) stays the base's, bit for bit.

Rules: every source must have the base's architecture (`ARCH_KEYS`; the differing keys are
named), each subset must belong to a model of that shape, and no (layer, expert) may be claimed
by two takes (the error names the layer, the expert and both claims). Sources are read lazily
(only the claimed rows, emo_jax/modular/lazy.py) and the result is streamed out layer by layer
(`lazy.write_params`: a model directory, renamed into place when complete), so memory holds one
layer of one array at a time; arrays keep the base's stored dtype.
"""

from __future__ import annotations


import numpy as np
from absl import logging

from emo_jax import storage
from emo_jax.config import ConfigError, routed_experts
from emo_jax.modular import lazy, subset as subset_lib

# Config keys two checkpoints must share for their experts to be interchangeable: the
# parameter shapes, and what the numbers inside them mean.
ARCH_KEYS = subset_lib.SHAPE_KEYS + ("model.rope_theta", "model.norm_eps")


class CompositionError(ConfigError):
    """The checkpoints or subsets cannot be composed; the message says which and why."""


def _value(config, dotted: str):
    section, key = dotted.split(".")
    return config[section][key]


def check_architecture(base_config, config, where: str) -> None:
    """Refuses a source whose architecture differs from the base's, naming the keys."""
    diff = [f"{k}={_value(config, k)!r} there but {_value(base_config, k)!r} in the base"
            for k in ARCH_KEYS if _value(config, k) != _value(base_config, k)]
    if diff:
        raise CompositionError(f"{where} has another architecture than the base "
                               f"({', '.join(diff)}); modules move only between checkpoints "
                               "of one architecture")


def claims(takes: list[tuple[str, subset_lib.Subset]], names: list[str]) -> dict:
    """{(layer, expert): take index}; two takes claiming one expert is a CompositionError."""
    owner = {}
    for t, (_, subset) in enumerate(takes):
        for layer, ids in enumerate(subset.layers):
            for expert in ids:
                if (layer, expert) in owner:
                    raise CompositionError(
                        f"layer {layer} expert {expert} is claimed twice: by "
                        f"{names[owner[layer, expert]]} and by {names[t]}; each expert can "
                        "come from one source only")
                owner[layer, expert] = t
    return owner


def compose(base: str, takes: list[tuple[str, subset_lib.Subset]], out: str, *,
            names: list[str] | None = None) -> dict:
    """Writes `base` with the takes' experts transplanted into `out`; returns a report.

    takes: (source checkpoint, subset of it) pairs. names: how errors and the metadata name
    each take (default 'take i').
    """
    if not takes:
        raise CompositionError("nothing to transplant: give at least one source and subset")
    names = names or [f"take {i}" for i in range(len(takes))]
    base_reader = lazy.ParamsReader(base)
    config = base_reader.config
    readers = []
    for (path, subset), name in zip(takes, names):
        reader = lazy.ParamsReader(path)
        check_architecture(config, reader.config, f"source {name} ({path})")
        subset.check_model(reader.config, where=f"the subset of {name}")
        readers.append(reader)
    owner = claims(takes, names)

    plans = {name: lazy.copy_plan(base_reader, name) for name in base_reader.names}
    for array in lazy.EXPERT_WEIGHTS + (lazy.ROUTER,):
        name = "blocks/moe/" + array
        for reader, tname in zip(readers, names):
            if reader.dtype(name) != base_reader.dtype(name):
                logging.warning("%s stores %s as %s; cast to the base's %s", tname, array,
                                reader.dtype(name), base_reader.dtype(name))
        plans[name] = lazy.layer_plan(name, base_reader.shape(name), base_reader.dtype(name),
                                      _patched_layer(base_reader, readers, takes, name))
    report = {
        "base": storage.absolute(base),
        "takes": [{"name": name, "checkpoint": storage.absolute(path),
                   "experts_per_layer": len(subset.layers[0]), "layers": subset.layers}
                  for (path, subset), name in zip(takes, names)],
        "experts_transplanted": len(owner),
        "routed_experts": routed_experts(config),
        "num_layers": config.model.num_layers,
    }
    lazy.write_params(out, plans, config, metadata={
        "step": base_reader.metadata.get("step"), "composed": report})
    return report


def _patched_layer(base_reader, readers, takes, name):
    """read(layer, start, stop) of a composed expert stack (experts start..stop-1) or router
    (all of it): the base's values with each take's claimed experts (rows, or router columns)
    read from its source."""
    router = name.endswith(lazy.ROUTER)

    def read(layer, start, stop):
        values = base_reader.read(name, (layer, slice(start, stop)))
        for reader, (_, subset) in zip(readers, takes):
            ids = subset.layers[layer]
            if router:
                values[:, ids] = reader.read(name, (layer, slice(start, stop), ids))
                continue
            ids = [i for i in ids if start <= i < stop]
            if ids:
                values[np.asarray(ids) - start] = reader.read(name, (layer, ids))
        return values

    return read


def format_report(report: dict) -> str:
    total = report["routed_experts"] * report["num_layers"]
    lines = [f"base {report['base']}: {report['experts_transplanted']} of {total} routed "
             f"experts transplanted"]
    for take in report["takes"]:
        lines.append(f"  {take['name']}: {take['experts_per_layer']} experts per layer from "
                     f"{take['checkpoint']}")
    return "\n".join(lines)
