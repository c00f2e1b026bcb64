"""The training state and the pure, jitted train and eval steps.

`TrainState` is everything a step reads and writes, and everything a checkpoint holds besides
the data iterator: the model, the AdamW state, the PRNG key of the routing pools, the step
counter and the non-finite-step counters. Steps work on its `nnx.State` (split from a graphdef
that is closed over), so they are plain functions of arrays: jitted with explicit shardings on
the mesh, the state donated.

Gradient accumulation (`train.micro_batches` = M): row i of the global batch belongs to
micro-batch i mod M, so every device keeps its own rows (no resharding). The M micro-batch
losses are scaled so that they add up to the loss of the whole batch exactly:
  * per-token means (cross-entropy, output z, router z) divide by the token totals of the step;
  * `moe.balance_scope='global'`: the balance statistics are those of the whole step. A first,
    gradient-free routing pass over all micro-batches sums the expert counts f_e of the step;
    the second pass (forward + backward, one micro-batch at a time) forms
    R * sum_e f_e(step) * P_e(micro-batch share). Same pool keys in both passes, so the routing
    is the same. This costs one extra forward pass (no backward) when M > 1; with M = 1 there
    is no extra pass. It is exact because f_e enters the loss as a constant: no method that
    runs each micro-batch's backward before knowing the step's counts can avoid a pre-pass
    without storing every micro-batch's activations (which is what accumulation avoids).
  * 'micro_batch' and the ablation scopes: each micro-batch's own balance loss, averaged over
    the M micro-batches.
  * `moe.balance_group_rows` = G > 0 (instead of a scope): K = B/G strided groups, group k
    holding rows k, k+K, k+2K, ... of the global batch, so they do not depend on M: G = B/M
    makes the groups the micro-batches (= 'micro_batch'), G = B one group (= 'global'). A group
    inside a micro-batch (G divides B/M) is balanced there with no pre-pass; a group spanning
    several micro-batches (G a multiple of B/M: micro-batches m with the same m mod K) takes its
    counts from the same pre-pass as 'global' (per micro-batch, summed per group).

A step whose loss or gradient norm is not finite is not applied (parameters and optimiser state
stay as they were) and is counted; the loop stops after `train.max_bad_steps` in a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax import parallel
from emo_jax.data.packing import opening_eos
from emo_jax.model import losses
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer
from emo_jax.train import modules
from emo_jax.train import optimizer as optim
from emo_jax.train.loss import load_metrics, loss_and_metrics

_POOL_STREAM = 1_000_003  # folded into the seed so pool keys never equal init keys

# Metrics that add up over micro-batches (shares of the step); the rest are averaged, or
# recomputed from the summed expert counts.
_SUMMED = ("loss", "cross_entropy", "output_z_loss", "router_z_loss", "predicted_tokens",
           "dropped_tokens", "expert_rows", "counts_LR", "tokens_L")


class TrainState(nnx.Module):
    """Model, optimiser, pool PRNG key and counters: the whole state of a training run."""

    def __init__(self, config, tx=None, trainable=None):
        """trainable: a modules.Trainable for module fine-tuning (only those expert rows get an
        optimizer, `self.rows`), or None: every parameter trains."""
        seed = config.train.seed
        self.model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(seed))
        tx = tx or optim.make_optimizer(config)
        if trainable is None:
            self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
        else:
            self.rows = modules.ExpertRows(self.model, trainable)
            self.optimizer = nnx.Optimizer(self.rows, tx, wrt=nnx.Param)
        self.rng = nnx.Variable(jax.random.fold_in(jax.random.PRNGKey(seed), _POOL_STREAM))
        self.step = nnx.Variable(jnp.zeros((), jnp.int32))  # steps taken, skipped ones included
        self.bad_in_a_row = nnx.Variable(jnp.zeros((), jnp.int32))  # consecutive skipped steps
        self.skipped = nnx.Variable(jnp.zeros((), jnp.int32))  # skipped steps in the whole run


def abstract_state(config, mesh, trainable=None):
    """(graphdef, abstract nnx.State with concrete shardings, shardings) without allocating."""
    abstract = nnx.eval_shape(lambda: TrainState(config, trainable=trainable))
    graphdef, state = nnx.split(abstract)
    shardings = parallel.state_shardings(state, mesh, config)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state, shardings


def init_state(config, mesh, trainable=None):
    """(graphdef, state, shardings): a fresh TrainState created directly in its shardings."""
    graphdef, _, shardings = abstract_state(config, mesh, trainable)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(TrainState(config, trainable=trainable)),
                        out_shardings=shardings)()
    return graphdef, state, shardings


def split_micro_batches(batch, micro_batches: int, mesh):
    """[B, S] -> [M, B/M, S]: micro-batch m holds rows m, m+M, m+2M, ... (no data movement)."""
    sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

    def one(x_BS):
        b, s = x_BS.shape
        x_MbS = x_BS.reshape(b // micro_batches, micro_batches, s).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x_MbS, sharding)

    return {k: one(v) for k, v in batch.items()}


def _token_totals(batch, num_layers, eos):
    _, mask_BS = losses.next_token_targets(batch["tokens"], batch["segment_ids"], eos)
    predicted = jnp.sum(mask_BS.astype(jnp.float32))
    real = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
    return predicted, jnp.full((num_layers,), real)


def loss_and_grads(model_graphdef, params, batch, config, step_key, num_shards: int, mesh,
                   to_model=None, pooled=True):
    """(loss, metrics, grads) of one optimiser step's batch, accumulated over micro-batches.

    Gradients are with respect to `params`: the model's state, or (module fine-tuning) what
    `to_model(params)` turns into the model's state.
    """
    to_model = to_model or (lambda p: p)

    def loss_fn(params, mb, key, **kwargs):
        model = nnx.merge(model_graphdef, to_model(params))
        return loss_and_metrics(model, mb, config, key, num_shards=num_shards, **kwargs)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m_count = config.train.micro_batches
    if m_count == 1:
        (loss, metrics), grads = grad_fn(params, batch, step_key, pooled=pooled)
        return loss, metrics, grads

    micro = split_micro_batches(batch, m_count, mesh)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(m_count))
    step_predicted, step_tokens_L = _token_totals(batch, config.model.num_layers,
                                                  opening_eos(config))
    extra = {"step_predicted": step_predicted, "step_tokens_L": step_tokens_L,
             "loss_scale": 1.0 / m_count, "pooled": pooled}
    rows = batch["tokens"].shape[0]
    group_rows = config.moe.balance_group_rows
    # Balance groups that span micro-batches need the pre-pass: the whole step ('global'), or
    # `balance_group_rows` larger than a micro-batch.
    spanning = group_rows > rows // m_count if group_rows else config.moe.balance_scope == "global"
    per_micro = {}
    if spanning:
        def count_one(_, inputs):
            mb, key = inputs
            # Fresh Variables at this trace level (nnx refuses ones from the outer trace).
            model = nnx.merge(model_graphdef, jax.tree.map(lambda x: x, to_model(params)))
            out = model(mb["tokens"], mb["segment_ids"], mb["positions"], pool_key=key,
                        pooled=pooled)
            return None, (out.routing.counts_BR.sum(1), out.routing.tokens_B.sum(1))

        _, (counts_MLR, tokens_ML) = jax.lax.scan(count_one, None, (micro, keys))
        counts_MLR = jax.lax.stop_gradient(counts_MLR)
        if not group_rows:
            extra["step_counts_LR"] = counts_MLR.sum(0)
        else:  # group k = micro-batches m with m mod K = k (K = rows / group_rows groups)
            groups = rows // group_rows
            span = m_count // groups

            def per_group(x_M):
                return jnp.tile(x_M.reshape(span, groups, *x_M.shape[1:]).sum(0),
                                (span,) + (1,) * (x_M.ndim - 1))

            per_micro = {"step_counts_LR": per_group(counts_MLR),
                         "group_tokens_L": per_group(jax.lax.stop_gradient(tokens_ML))}
            extra["group_weight"] = 1.0 / groups

    def accumulate(grads_acc, inputs):
        mb, key, group = inputs
        (loss, metrics), grads = grad_fn(params, mb, key, **extra, **group)
        return jax.tree.map(jnp.add, grads_acc, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses_M, metrics_M) = jax.lax.scan(accumulate, zeros, (micro, keys, per_micro))
    metrics = {}
    for name, value in metrics_M.items():
        summed = name in _SUMMED or (name == "balance_loss" and spanning)
        metrics[name] = value.sum(0) if summed else value.mean(0)
    metrics.update(load_metrics(metrics["counts_LR"], ModelConfig.from_config(config)))
    return losses_M.sum(), metrics, grads


def _update_if(ok, optimizer, trained, grads):
    """`optimizer.update(trained, grads)` only when `ok`, under `lax.cond`.

    A skipped step leaves the parameters and the whole optimiser state (Adam moments, counts)
    bit-identical: the false branch returns them untouched. Unlike an update followed by a
    select between the new and the old values, no second copy of the parameters and the
    optimiser state is kept alive (the cond's outputs alias its donated inputs).
    """
    graphdef, state = nnx.split((optimizer, trained))

    def apply(state, grads):
        opt, model = nnx.merge(graphdef, state)
        opt.update(model, grads)
        return nnx.state((opt, model))

    nnx.update((optimizer, trained), jax.lax.cond(ok, apply, lambda s, _: s, state, grads))


def pool_steps_of(config):
    """Steps trained with document pools, or None when every step is (`moe.pool_off_fraction`:
    the last steps route with plain top-k)."""
    off = config.moe.pool_off_fraction
    if not off or config.moe.pool != "document":
        return None
    return round(config.train.steps * (1.0 - off))


def make_train_step(config, graphdef, shardings, mesh):
    """`train_step(state, batch) -> (state, metrics)`, jitted; the state is donated.

    `batch` is the global batch (int32 [B, S] arrays sharded over the batch axes). Metrics are
    replicated scalars and per-layer arrays (suffix _L); see `emo_jax/train/metrics.py`.
    A TrainState with `rows` (module fine-tuning, modules.py) trains only them: gradients and
    the optimizer see the rows, and the model is the frozen one with the new rows written in.
    """
    num_shards = parallel.batch_shards(mesh)
    schedule = optim.learning_rate_schedule(config)
    inject = config.train.inject_nonfinite_step
    pool_steps = pool_steps_of(config)

    def train_step(state, batch):
        ts = nnx.merge(graphdef, state)
        model_graphdef, params = nnx.split(ts.model)
        trained, to_model = ts.model, None
        if hasattr(ts, "rows"):
            frozen, idx_LK = params, ts.rows.idx[...]
            trained, params = ts.rows, nnx.state(ts.rows, nnx.Param)

            def to_model(rows):
                return modules.merged(frozen, rows, idx_LK)
        step_key = jax.random.fold_in(ts.rng[...], ts.step[...])
        pooled = True if pool_steps is None else ts.step[...] < pool_steps
        loss, metrics, grads = loss_and_grads(model_graphdef, params, batch, config, step_key,
                                              num_shards, mesh, to_model, pooled)
        if inject:
            poison = jnp.where(ts.step[...] + 1 == inject, jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optim.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr = schedule(ts.optimizer.step[...])
        _update_if(ok, ts.optimizer, trained, grads)
        if to_model is not None:
            nnx.update(ts.model, to_model(nnx.state(ts.rows, nnx.Param)))
        ts.step[...] = ts.step[...] + 1
        ts.bad_in_a_row[...] = jnp.where(ok, 0, ts.bad_in_a_row[...] + 1)
        ts.skipped[...] = ts.skipped[...] + (~ok).astype(jnp.int32)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=lr,
                       step_ok=ok.astype(jnp.float32), skipped_steps=ts.skipped[...],
                       bad_steps_in_a_row=ts.bad_in_a_row[...])
        return nnx.state(ts), metrics

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                     out_shardings=(shardings, replicated), donate_argnums=0)

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    def compile_for(state):
        """Compiles the step ahead of its first call (for the state's shapes)."""
        batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32,
                                         sharding=parallel.batch_sharding(mesh))
                 for k in ("tokens", "segment_ids", "positions")}
        with jax.set_mesh(mesh):
            return jitted.lower(state, batch).compile()

    run.jitted = jitted
    run.compile = compile_for
    return run


def eval_sums(model, batch, config, expert_mask_LR=None):
    """Per-row sums for held-out evaluation (no pool sampling: `moe.eval_pool` applies).

    Returns dict of float32 [B]: `ce_sum` (summed token cross-entropy) and `predicted`
    (tokens predicted), so any grouping of rows (per domain) averages exactly.
    """
    targets_BS, mask_BS = losses.next_token_targets(batch["tokens"], batch["segment_ids"],
                                                    opening_eos(config))
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"], pool_key=None,
                expert_mask_LR=expert_mask_LR, targets_BS=targets_BS)
    maskf_BS = mask_BS.astype(jnp.float32)
    return {"ce_sum": jnp.sum(out.token_loss_BS * maskf_BS, -1),
            "predicted": jnp.sum(maskf_BS, -1)}


def make_eval_step(config, model_graphdef, param_shardings, mesh):
    """`eval_step(params, batch, expert_mask_LR=None) -> {ce_sum, predicted}` per row, jitted.

    `params` is the model's nnx.State (e.g. `state['model']` of a TrainState); an optional bool
    [L, R] `expert_mask_LR` evaluates a subset of the experts by masking.
    """
    replicated = NamedSharding(mesh, P())

    def eval_step(params, batch, expert_mask_LR):
        model = nnx.merge(model_graphdef, params)
        return eval_sums(model, batch, config, expert_mask_LR)

    jitted = jax.jit(eval_step, in_shardings=(param_shardings, parallel.batch_sharding(mesh),
                                              replicated),
                     out_shardings=replicated)

    def run(params, batch, expert_mask_LR=None):
        with jax.set_mesh(mesh):
            return jitted(params, batch, expert_mask_LR)

    return run
