"""The optimiser from the `train.*` keys: AdamW with a warm-up + decay (+ anneal) learning-rate
schedule, weight decay masked off embeddings and norms, and global-norm gradient clipping.

The schedule, over `train.steps` optimiser steps (the reference recipe: docs/METHOD.md §5):

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
    """Learning rate of update n (0-based count of applied updates).

    Warm-up: lr * (n + 1) / warmup_steps, so the first update already moves and update
    warmup_steps - 1 is at the peak. Decay over `decay` = steps - warmup - anneal updates:
    cosine or linear from lr to lr * final_lr_fraction (or constant lr). Anneal: linear from the
    decay's end value towards 0 over the last anneal_steps updates.
    """
    t = config.train
    warmup = min(t.warmup_steps, t.steps)
    anneal = min(t.anneal_steps, t.steps - warmup)
    decay = max(t.steps - warmup - anneal, 1)
    peak = t.lr
    final = peak * (1.0 if t.schedule == "constant" else t.final_lr_fraction)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum((n + 1.0) / max(warmup, 1), 1.0)
        p = jnp.clip((n - warmup) / decay, 0.0, 1.0)
        if t.schedule == "cosine":
            main = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif t.schedule == "linear":
            main = peak + (final - peak) * p
        else:
            main = jnp.full_like(n, peak)
        lr = jnp.where(n < warmup, warm, main)
        if anneal > 0:
            q = jnp.clip((n - warmup - decay) / anneal, 0.0, 1.0)
            lr = jnp.where(n >= warmup + decay, final * (1.0 - q), lr)
        return lr

    return schedule


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
