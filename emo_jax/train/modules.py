"""Module fine-tuning: train only a subset's experts of a model (EMO's modules), nothing else.

    python -m emo_jax.train --config=... --init_checkpoint=DIR --trainable=subset.json \\
        [--train_router=rows|all|none] --workdir=...

What trains, per layer l with the subset's K kept routed ids idx[l]:
  * rows idx[l] of the stacked expert weights w_gate, w_up, w_down ([L, R, ...]: row = expert);
  * the router: 'rows' (default) its columns idx[l] ([L, D, R]: column = expert), 'all' the
    whole router, 'none' nothing of it.
Everything else (attention, embeddings, norms, head, shared experts and their router, the other
experts inside the same stacked arrays, the other router columns) is frozen and comes out
bit-identical.

How: the trainable values are their own small module, `ExpertRows` (w_gate [L, K, D, F], ...,
router [L, D, K]), and the optimizer is built over it alone, so AdamW moments exist only for
them (optimizer memory falls by the frozen share) and weight decay cannot reach a frozen value.
The step scatters the rows into the frozen full arrays (`merged`: `.at[l, idx].set(rows)`, an
exact copy of every other element) before the forward pass, differentiates with respect to the
rows only, and writes the updated rows back into the model, so the model in the TrainState
(and in every checkpoint) is always the complete fine-tuned model; the rows and their AdamW
state are checkpointed with the rest of the TrainState and resume exactly.

A workdir records what it fine-tunes in `trainable.json` (the subset and the router mode); a
rerun without --trainable resumes it, a rerun with another one is refused.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax import storage, subset_file
from emo_jax.config import ConfigError, routed_experts

ROUTER_MODES = ("rows", "all", "none")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
RECORD = "trainable.json"


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What a module fine-tuning run trains: kept routed ids per layer and the router mode."""

    layers: tuple  # per layer, the routed expert ids that train (ascending)
    train_router: str  # 'rows' | 'all' | 'none'
    subset: dict = dataclasses.field(compare=False, default=None)  # the subset file's JSON

    def idx_LK(self) -> np.ndarray:
        return np.asarray(self.layers, np.int32)

    def to_json(self) -> dict:
        return {"subset": self.subset, "train_router": self.train_router}

    def describe(self, config) -> str:
        routed = routed_experts(config)
        router = {"rows": "and their router columns", "all": "and the whole router",
                  "none": "(router frozen)"}[self.train_router]
        return (f"{len(self.layers[0])} of {routed} routed experts per layer {router}; "
                "everything else frozen")


def make_trainable(subset, config, train_router: str = "rows") -> Trainable:
    """A Trainable from a Subset (emo_jax/subset_file.py) of the model `config` describes."""
    if train_router not in ROUTER_MODES:
        raise ConfigError(f"--train_router={train_router!r}; valid: {', '.join(ROUTER_MODES)}")
    subset.check_model(config, where="the --trainable subset")
    if len(set(subset.keep_per_layer)) > 1:
        raise ConfigError("the --trainable subset keeps different numbers of experts per layer "
                          f"({','.join(map(str, subset.keep_per_layer))}); extract it "
                          "(emo_jax.extract) and fine-tune the extracted model with "
                          "--init_checkpoint, or train a subset of equal layers")
    return Trainable(layers=tuple(tuple(ids) for ids in subset.layers),
                     train_router=train_router, subset=subset.to_json())


class ExpertRows(nnx.Module):
    """The trainable values of module fine-tuning, gathered from `model` (module docstring).

    idx [L, K] (int32, not a Param: it never trains) says which expert rows they are.
    """

    def __init__(self, model, trainable: Trainable):
        idx_LK = jnp.asarray(trainable.idx_LK())
        moe = model.blocks.moe
        layers_L1 = jnp.arange(idx_LK.shape[0])[:, None]
        # K is replicated: any K works on any mesh (the full arrays keep their own layout).
        axes = {"w_gate": ("layers", None, "embed", "expert_mlp"),
                "w_up": ("layers", None, "embed", "expert_mlp"),
                "w_down": ("layers", None, "expert_mlp", "embed")}
        for name in EXPERT_WEIGHTS:
            rows = getattr(moe, name)[...][layers_L1, idx_LK]
            setattr(self, name, nnx.Param(rows, logical_axes=axes[name]))
        router_LDR = moe.router[...]
        if trainable.train_router == "rows":
            self.router = nnx.Param(jnp.take_along_axis(router_LDR, idx_LK[:, None, :], axis=2),
                                    logical_axes=("layers", "embed", None))
        elif trainable.train_router == "all":
            self.router = nnx.Param(router_LDR, logical_axes=("layers", "embed", "router"))
        else:
            self.router = None
        self.idx = nnx.Variable(idx_LK.astype(jnp.int32))


def _router_mode(rows, router_LDR) -> str:
    if "router" not in rows:
        return "none"
    return "all" if rows["router"].shape == router_LDR.shape else "rows"


def merged(frozen, rows, idx_LK):
    """The full model state: `frozen` (the model's nnx.State) with the trainable values `rows`
    (ExpertRows' Params) written at their places. Pure; differentiable in `rows`."""
    out = jax.tree.map(lambda x: x, frozen)
    moe = out["blocks"]["moe"]
    layers_L1 = jnp.arange(idx_LK.shape[0])[:, None]
    for name in EXPERT_WEIGHTS:
        full = moe[name]
        moe[name] = full.replace(full[...].at[layers_L1, idx_LK].set(rows[name][...]))
    router = moe["router"]
    mode = _router_mode(rows, router)
    if mode == "all":
        moe["router"] = router.replace(rows["router"][...])
    elif mode == "rows":
        _, d, _ = router.shape
        at = (layers_L1[:, :, None], jnp.arange(d)[None, :, None], idx_LK[:, None, :])
        moe["router"] = router.replace(router[...].at[at].set(rows["router"][...]))
    return out


def gather(model_state, rows_state):
    """ExpertRows' Param values read from a model's nnx.State (after its parameters changed,
    e.g. loaded from --init_checkpoint): {name: array}."""
    moe = model_state["blocks"]["moe"]
    idx_LK = rows_state["idx"][...]
    layers_L1 = jnp.arange(idx_LK.shape[0])[:, None]
    out = {name: moe[name][...][layers_L1, idx_LK] for name in EXPERT_WEIGHTS}
    mode = _router_mode(rows_state, moe["router"])
    if mode == "all":
        out["router"] = moe["router"][...]
    elif mode == "rows":
        out["router"] = jnp.take_along_axis(moe["router"][...], idx_LK[:, None, :], axis=2)
    return out


def refresh_rows(state, shardings) -> None:
    """Sets the rows of a TrainState's nnx.State from its model (in their shardings)."""
    names = [n for n in EXPERT_WEIGHTS + ("router",) if n in state["rows"]]
    out_shardings = {n: shardings["rows"][n] for n in names}
    values = jax.jit(gather, out_shardings=out_shardings)(state["model"], state["rows"])
    for name in names:
        state["rows"][name] = state["rows"][name].replace(values[name])


def state_bytes(abstract_state, key: str) -> int:
    """Bytes of the arrays under `key` of an (abstract) TrainState state."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract_state[key])))


def trainable_params(abstract_state) -> int:
    """How many values train in a module fine-tuning TrainState (its rows' Params)."""
    rows = abstract_state["rows"]
    return int(sum(np.prod(rows[n].shape) for n in EXPERT_WEIGHTS + ("router",) if n in rows))


def for_run(workdir: str, trainable, train_router: str | None, config,
            resuming: bool) -> Trainable | None:
    """The Trainable of a run: from --trainable (a subset path or Subset) and --train_router,
    checked against what the workdir records (module docstring). None: full training."""
    record_path = storage.join(workdir, RECORD)
    recorded = None
    if resuming and storage.isfile(record_path):
        recorded = json.loads(storage.read_text(record_path))
    if trainable is None and train_router is not None:
        raise ConfigError("--train_router needs --trainable=subset.json (the experts to train)")
    if trainable is None:
        if recorded is None:
            return None
        return make_trainable(subset_file.from_json(recorded["subset"], where=record_path),
                              config, recorded["train_router"])
    subset = subset_file.load(trainable) if isinstance(trainable, str) else trainable
    wanted = make_trainable(subset, config, train_router or "rows")
    if resuming and recorded is None:
        raise ConfigError(f"{workdir} holds checkpoints of a run that trains every parameter; "
                          "--trainable cannot change it: use a new --workdir (with "
                          "--init_checkpoint) for module fine-tuning")
    if recorded is not None:
        before = make_trainable(subset_file.from_json(recorded["subset"], where=record_path),
                                config, recorded["train_router"])
        if before != wanted:
            raise ConfigError(f"{workdir} fine-tunes other experts or another router mode "
                              f"({record_path}); rerun without --trainable/--train_router to "
                              "resume it, or use a new --workdir")
    return wanted


def record(workdir: str, trainable: Trainable | None) -> None:
    """Writes the workdir's trainable.json (process 0)."""
    if trainable is None or jax.process_index() != 0:
        return
    storage.write_text(storage.join(workdir, RECORD), json.dumps(trainable.to_json(), indent=1))
