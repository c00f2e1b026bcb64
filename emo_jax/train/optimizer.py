"""The optimiser from the `train.*` keys: AdamW with a warm-up + decay (+ anneal) learning-rate
schedule, weight decay masked off embeddings and norms, and global-norm gradient clipping.

The schedule, over `train.steps` optimiser steps (EMO_METHOD.md §3):

    warm-up   linear 0 -> lr over `warmup_steps`
    decay     `schedule`: 'cosine' or 'linear' from lr to lr * final_lr_fraction, or 'constant'
              (stays at lr), over the steps left after warm-up and anneal
    anneal    linear from the decay's last value to 0 over `anneal_steps` (0 = none)

The output head is decayed like every other matrix; only the token embedding and RMSNorm scales
are not (the reference: "none on embeddings"; decaying a norm scale pulls it towards 0, not 1).
This module builds the optax transformation only; it never touches parameters itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Learning rate as a function of the optimiser step (0-based count of applied updates)."""
    t = config.train
    warmup = min(t.warmup_steps, t.steps)
    anneal = min(t.anneal_steps, t.steps - warmup)
    decay = max(t.steps - warmup - anneal, 1)
    final = t.lr * (1.0 if t.schedule == "constant" else t.final_lr_fraction)
    if t.schedule == "cosine":
        main = optax.cosine_decay_schedule(t.lr, decay, alpha=t.final_lr_fraction)
    elif t.schedule == "linear":
        main = optax.linear_schedule(t.lr, final, decay)
    else:
        main = optax.constant_schedule(t.lr)
    parts = [main]
    boundaries = []
    if warmup > 0:
        parts.insert(0, optax.linear_schedule(0.0, t.lr, warmup))
        boundaries.append(warmup)
    if anneal > 0:
        parts.append(optax.linear_schedule(final, 0.0, anneal))
        boundaries.append(warmup + decay)
    return optax.join_schedules(parts, boundaries) if boundaries else main


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        names.append(str(name))
    return names


def decays(names: list[str]) -> bool:
    """Whether the parameter at this path gets weight decay: not the embedding, not a norm."""
    names = [n for n in names if n != "value"]
    if names and names[0] == "embed":
        return False
    return not any(n.endswith("norm") for n in names)


def weight_decay_mask(params):
    """A tree of bools like `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(_path_names(path)), params)


def make_optimizer(config) -> optax.GradientTransformation:
    """clip (if train.clip_norm > 0) -> AdamW(schedule, b1, b2, eps, masked weight decay)."""
    t = config.train
    adamw = optax.adamw(learning_rate_schedule(config), b1=t.b1, b2=t.b2, eps=t.adam_eps,
                        weight_decay=t.weight_decay, mask=weight_decay_mask)
    if t.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw)
    return adamw


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf, in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
