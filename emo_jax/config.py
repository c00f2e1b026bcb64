"""Every config key of emo_jax: its default, its meaning, and its validation.

This is the one place a key is defined. Config files (`configs/*.py`) start from
`default_config()` and override values; `validate(config)` is called by every entry point before
anything is built and raises `ConfigError` with one sentence naming the key and what is valid.
A key that is not here does not exist (the config is locked after loading).

Sections: `model.*` (the Transformer), `moe.*` (experts and EMO routing), `data.*` (the Grain
pipeline), `train.*` (optimiser, schedule, loop), `mesh.*` (device mesh and sharding rules),
`checkpoint.*` (Orbax).
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
    """A config key has an invalid value; the message names the key and what is valid."""


# Config keys that decide the shapes of the parameters (a checkpoint or subset of a model with
# other values is refused, naming them).
SHAPE_KEYS = ("model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
              "model.num_kv_heads", "model.head_dim", "model.qk_norm", "moe.num_experts",
              "moe.num_shared_experts", "moe.expert_hidden", "moe.experts_per_layer")


def default_config() -> ml_collections.ConfigDict:
    """The defaults: a tiny byte-level EMO model that trains on a CPU."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 264  # must cover the tokenizer's ids (byte tokenizer: 256 bytes + 8 specials)
    m.d_model = 128  # residual stream width
    m.num_layers = 4  # Transformer blocks (each: attention + MoE), scanned with nnx.scan
    m.num_heads = 4  # query heads
    m.num_kv_heads = 4  # key/value heads (grouped-query attention when < num_heads)
    m.head_dim = 32  # per-head width
    m.rope_theta = 10_000.0  # RoPE base frequency
    m.norm_eps = 1e-6  # RMSNorm epsilon
    m.qk_norm = False  # RMSNorm on queries and keys per head (off in the reference)
    m.init_std = 0.02  # std of the normal initialiser of every weight matrix
    # Distribution of every weight matrix: 'normal' (N(0, init_std^2)) | 'truncated_normal'
    # (N(0, init_std^2) cut at +-3 init_std, not rescaled, as the reference's trunc_normal_).
    m.init = "normal"
    m.compute_dtype = "float32"  # matmul dtype: 'float32' | 'bfloat16' (params stay float32)
    m.remat = "none"  # activation rematerialisation per block: 'none' | 'full' | 'dots'
    # Attention kernel (emo_jax/model/attention.py): 'auto' (splash on TPU, chunked on GPU;
    # on CPU dense up to 1024 positions, chunked beyond), 'dense' ([B,H,S,S] float32 scores),
    # 'chunked' (XLA flash attention, O(S * attention_chunk) memory), 'cudnn' (cuDNN flash
    # attention with packed segments, bf16 on NVIDIA GPUs), 'splash' (Pallas, TPU).
    m.attention = "auto"
    m.attention_chunk = 512  # query and key chunk length of 'chunked' attention
    # Positions per chunk of the output head fused with the cross-entropy (all rows of a chunk
    # at once: at most rows x loss_chunk x vocab float32 logits live); 0 = dense logits.
    m.loss_chunk = 0

    c.moe = e = ml_collections.ConfigDict()
    e.num_experts = 32  # experts per layer, shared ones included (R = num_experts - shared)
    # always-on experts (the last of num_experts); one has weight 1.0, two or more are weighted
    # by a softmax over their own router (blocks.moe.shared_router), as the reference's HF model
    e.num_shared_experts = 0
    e.top_k = 4  # routed experts per token
    e.expert_hidden = 128  # SwiGLU hidden width of one expert
    # Experts of each layer, shared ones included, comma-separated (e.g. '6,5'; the reference's
    # num_experts_per_layer), for models whose layers keep different numbers of experts, such as
    # a subset chosen under a total budget (`select --keep_total`). The stacked weights are
    # padded to moe.num_experts, which must be the largest count; layer l's routed experts are
    # ids 0..count_l - num_shared_experts - 1, the padding is zero and masked out of routing.
    # '' = moe.num_experts in every layer.
    e.experts_per_layer = ""
    e.pool = "document"  # 'document' (EMO) | 'none' (standard MoE)
    e.pool_min = 4  # smallest document pool, drawn uniformly in [pool_min, pool_max]
    e.pool_max = 32  # largest document pool (>= routed experts means: sometimes unrestricted)
    # The last this fraction of train.steps route without pools (plain top-k over all routed
    # experts), a pool schedule that lets the full model settle; 0 = pools throughout.
    e.pool_off_fraction = 0.0
    e.eval_pool = 0  # fixed pool size when not training; 0 = no pool (plain top-k)
    # total load-balance loss weight, split evenly over layers; at 0.01 an EMO model leaves
    # about a fifth of its experts idle in a step (docs/RESULTS.md §10)
    e.balance_weight = 0.1
    e.router_z_weight = 0.001  # total router z-loss weight, split evenly over layers
    # Over what the balance statistics are summed before the loss is formed:
    # 'global' (whole global batch, all micro-batches of a step), 'micro_batch' (each
    # accumulation micro-step separately), 'local' (each device shard: ablation), 'sequence'
    # (each packed row: ablation). Groups of a fixed number of rows: moe.balance_group_rows.
    e.balance_scope = "global"
    # Balance groups of this many rows of the global batch, independent of micro-batching
    # (0 = off: moe.balance_scope decides). With B rows there are K = B / balance_group_rows
    # groups; group k holds rows k, k+K, k+2K, ... (strided like micro-batches, so rows/M makes
    # a group equal to a micro-batch, B equals 'global'); each group gets its own balance loss
    # and the losses are averaged over the K groups. Must divide data.batch_size and divide or
    # be a multiple of the rows of one micro-batch; needs moe.balance_scope='global'.
    # The reference reduces over 512 rows (lb_global_batch_size). Small groups make a standard
    # MoE worse and an EMO model more modular (docs/RESULTS.md §10).
    e.balance_group_rows = 0
    # Local grouped expert matmul, all dropless: 'auto' (megablox on TPU, looped on CPU,
    # blocked on GPU), 'megablox' (the Pallas TPU grouped-matmul kernel), 'ragged_dot',
    # 'blocked' (one batched matmul over expert groups padded to block_size), 'looped' (a loop
    # over the used blocks, plain matmuls: fastest on CPU).
    e.grouped_matmul = "auto"
    e.block_size = 128  # rows per block of the 'blocked' and 'looped' grouped matmuls
    # 'blocked' runs its blocks in rematerialised chunks of at most this many (0 = all at once),
    # bounding the per-block weight copies to blocked_chunk_blocks x D x F per weight.
    e.blocked_chunk_blocks = 16
    # Expert-parallel dispatch when mesh.expert > 1: 'auto' (ragged where the backend has
    # ragged_all_to_all, else capacity), 'capacity' (all_to_all on capacity buffers, may drop),
    # 'ragged' (dropless ragged_all_to_all).
    e.dispatch = "auto"
    e.capacity_factor = 2.0  # capacity buffers hold capacity_factor * fair share of assignments

    c.data = d = ml_collections.ConfigDict()
    d.train_sources = ""  # sources spec (see emo_jax/data/sources.py); '' = the bundled corpus
    d.eval_sources = ""  # held-out sources spec; '' = the bundled corpus's eval split
    d.text_field = "text"  # JSON key (or TFDS feature) holding a document's text
    d.tfds_data_dir = ""  # where 'tfds:' sources live ('' = TFDS default: $TFDS_DATA_DIR)
    d.tokenizer = "byte"  # 'byte' | 'sentencepiece:PATH' | 'hf:PATH/tokenizer.json'
    d.seq_len = 256  # tokens per packed row
    d.batch_size = 16  # global batch, in rows (split over hosts, then over devices)
    d.packing = "first_fit"  # 'first_fit' | 'best_fit' | 'concat_then_split'
    d.packing_bins = 16  # rows packed at once by first_fit / best_fit
    d.shuffle = True  # shuffle documents every epoch
    d.seed = 0  # data order seed (independent of the model seed)
    d.num_epochs = 0  # 0 = repeat forever
    d.worker_count = 0  # Grain multiprocess workers (0 = in-process)
    d.read_threads = 2  # threads reading and tokenizing documents per process (0 = inline)
    d.prefetch = 2  # batches prefetched
    d.on_bad_record = "skip"  # 'skip' (count it) | 'error'
    # Where eos sits at a document boundary (docs/METHOD.md section 7), in training and
    # evaluation alike: 'eos_closes' (eos ends its document; a segment's last token predicts
    # nothing) | 'eos_opens' (every document starts with eos, as the reference's stream does,
    # and a segment's last token predicts the first token of the next segment of its row: the
    # eos, so "the document ends here" is trained, as in the reference).
    d.boundary = "eos_closes"

    c.train = t = ml_collections.ConfigDict()
    t.steps = 200  # optimiser steps
    t.seed = 0  # parameter init and routing-pool seed
    t.lr = 3e-3  # peak learning rate
    t.warmup_steps = 20  # linear warm-up steps
    t.schedule = "cosine"  # decay after warm-up: 'cosine' | 'linear' | 'constant'
    t.final_lr_fraction = 0.1  # learning rate at the end of the decay, as a fraction of peak
    t.anneal_steps = 0  # extra final steps annealed linearly to 0 (0 = none)
    t.b1 = 0.9
    t.b2 = 0.95
    t.weight_decay = 0.1  # AdamW decay, masked off embeddings and norms
    t.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    t.micro_batches = 1  # gradient accumulation: micro-batches per step
    t.output_z_weight = 1e-5  # output-logit z-loss weight
    t.eval_every = 100  # evaluate every N steps (0 = only at the end)
    t.eval_batches = 4  # batches per evaluation
    t.log_every = 10  # metric lines every N steps
    t.max_bad_steps = 5  # stop after this many consecutive non-finite steps
    t.adam_eps = 1e-8  # AdamW epsilon
    t.peak_tflops = 0.0  # per-device peak TFLOP/s for MFU (0 = by device kind from the table)
    t.inject_nonfinite_step = 0  # test hook: step N gets a NaN loss and gradients (0 = off)

    c.mesh = s = ml_collections.ConfigDict()
    s.data = -1  # data-parallel axis size (-1 = the devices left over)
    s.fsdp = 1  # fully-sharded axis size
    s.expert = 1  # expert-parallel axis size (must divide the routed experts)
    # Logical parameter axis -> mesh axis ('' = replicated; 'a,b' = several mesh axes). Every
    # parameter names its axes (see emo_jax/model/layers.py); changing a layout is an edit here.
    # A mesh axis splits at most one axis of a parameter: the first in its layout whose rule
    # names it (emo_jax/model/mesh_context.py, logical_spec). So with 'embed' and 'expert_mlp' on
    # 'fsdp', expert gate/up [E, D, F] split along d_model and expert down [E, F, D] along the
    # hidden axis: no expert weight is split along its minor axis, which a TPU pads to 128 lanes
    # (docs/RESULTS.md §3.2).
    s.rules = ml_collections.ConfigDict({
        "vocab": "",  # embedding / output-head vocabulary axis
        "embed": "fsdp",  # d_model axis of every weight matrix
        "heads": "",  # query heads
        "kv_heads": "",  # key/value heads
        "head_dim": "",  # per-head width
        "norm": "",  # RMSNorm scales
        "router": "",  # router output axis (routed experts)
        "expert": "expert",  # stacked routed experts
        "expert_mlp": "fsdp",  # an expert's hidden axis (taken by expert down projections)
        "shared": "",  # stacked shared experts (and the shared router's output axis)
        "mlp": "fsdp",  # a shared expert's hidden axis (taken by its down projection)
        "layers": "",  # the stacked-layer axis of scanned blocks
    })

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    k.keep = 3  # checkpoints kept
    k.async_save = True  # save in the background while training continues
    k.save_on_signal = True  # on SIGTERM/SIGINT: save a checkpoint, then exit (preemption)
    # test hook: the save of step N runs under a 64 KiB file-size limit (RLIMIT_FSIZE), so its
    # writes fail with EFBIG as on a full disk or quota (0 = off)
    k.inject_save_failure_step = 0
    return c


_CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("auto", "dense", "chunked", "cudnn", "splash"),
    "model.init": ("normal", "truncated_normal"),
    "moe.pool": ("document", "none"),
    "moe.balance_scope": ("global", "micro_batch", "local", "sequence"),
    "moe.grouped_matmul": ("auto", "megablox", "ragged_dot", "blocked", "looped"),
    "moe.dispatch": ("auto", "capacity", "ragged"),
    "data.packing": ("first_fit", "best_fit", "concat_then_split"),
    "data.on_bad_record": ("skip", "error"),
    "data.boundary": ("eos_closes", "eos_opens"),
    "train.schedule": ("cosine", "linear", "constant"),
}

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.head_dim", "model.rope_theta", "model.norm_eps",
    "moe.num_experts", "moe.top_k", "moe.expert_hidden", "moe.pool_min", "moe.pool_max",
    "moe.block_size", "moe.capacity_factor", "data.seq_len", "data.batch_size",
    "data.packing_bins", "train.steps", "train.lr", "train.micro_batches", "train.log_every",
    "train.eval_batches", "train.max_bad_steps", "train.adam_eps", "checkpoint.every",
    "checkpoint.keep",
)

# Integer keys: key -> (smallest valid value, what the valid values mean).
_INTEGERS = {
    "model.attention_chunk": (1, "an integer >= 1 (positions per chunk)"),
    "model.loss_chunk": (0, "an integer >= 0 (positions per chunk; 0 = dense logits)"),
    "moe.blocked_chunk_blocks": (0, "an integer >= 0 (blocks per chunk; 0 = all at once)"),
    "moe.balance_group_rows": (0, "an integer >= 0 (rows per balance group; 0 = off)"),
}

_NON_NEGATIVE = (
    "model.init_std", "moe.num_shared_experts", "moe.eval_pool", "moe.balance_weight",
    "moe.router_z_weight",
    "data.seed", "data.num_epochs", "data.worker_count", "data.read_threads", "data.prefetch",
    "train.warmup_steps", "train.final_lr_fraction", "train.anneal_steps", "train.weight_decay",
    "train.clip_norm", "train.output_z_weight", "train.eval_every", "train.peak_tflops",
    "train.inject_nonfinite_step", "checkpoint.inject_save_failure_step",
)


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _require(condition: bool, message: str):
    if not condition:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every key; returns the config unchanged or raises ConfigError (one sentence)."""
    known = default_config()
    for section in known.keys():
        _require(section in config, f"config section '{section}' is missing")
        for key in config[section].keys():
            _require(key in known[section], f"unknown config key '{section}.{key}'; valid keys "
                     f"of '{section}': {', '.join(sorted(known[section].keys()))}")
        for key in known[section].keys():
            _require(key in config[section], f"config key '{section}.{key}' is missing")
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        _require(value in choices, f"config key '{key}' is {value!r}; valid: {', '.join(choices)}")
    for key in _POSITIVE:
        value = _get(config, key)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"config key '{key}' is {value!r}; it must be a number > 0")
    for key in _NON_NEGATIVE:
        value = _get(config, key)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                 f"config key '{key}' is {value!r}; it must be a number >= 0")
    for key, (low, valid) in _INTEGERS.items():
        value = _get(config, key)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                 f"config key '{key}' is {value!r}; it must be {valid}")

    m, e = config.model, config.moe
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads "
             f"({m.num_kv_heads})")
    _require(m.head_dim % 2 == 0, f"model.head_dim ({m.head_dim}) must be even for RoPE")
    routed = e.num_experts - e.num_shared_experts
    _require(routed >= 1, f"moe.num_experts ({e.num_experts}) must exceed "
             f"moe.num_shared_experts ({e.num_shared_experts}) by at least one routed expert")
    _require(e.top_k <= routed, f"moe.top_k ({e.top_k}) must be <= the routed experts "
             f"({routed} = moe.num_experts - moe.num_shared_experts)")
    _check_experts_per_layer(config)
    _require(e.pool_min <= e.pool_max,
             f"moe.pool_min ({e.pool_min}) must be <= moe.pool_max ({e.pool_max})")
    _require(e.pool_min >= e.top_k, f"moe.pool_min ({e.pool_min}) must be >= moe.top_k "
             f"({e.top_k}): a pool smaller than top_k cannot route a token")
    _require(isinstance(e.pool_off_fraction, (int, float)) and 0 <= e.pool_off_fraction < 1,
             f"config key 'moe.pool_off_fraction' is {e.pool_off_fraction!r}; it must be in "
             "[0, 1) (the last fraction of train.steps trained without pools)")
    _require(e.eval_pool == 0 or e.eval_pool >= e.top_k,
             f"moe.eval_pool ({e.eval_pool}) must be 0 (no pool) or >= moe.top_k ({e.top_k})")
    _require(config.data.batch_size % config.train.micro_batches == 0,
             f"data.batch_size ({config.data.batch_size}) must be divisible by "
             f"train.micro_batches ({config.train.micro_batches})")
    _check_balance_groups(config)
    t = config.train
    for key in ("b1", "b2"):
        _require(isinstance(t[key], (int, float)) and 0 <= t[key] < 1,
                 f"config key 'train.{key}' is {t[key]!r}; it must be in [0, 1)")
    _require(t.final_lr_fraction <= 1, f"config key 'train.final_lr_fraction' is "
             f"{t.final_lr_fraction!r}; it must be in [0, 1]")
    for axis in ("data", "fsdp", "expert"):
        size = config.mesh[axis]
        _require(isinstance(size, int) and (size == -1 or size >= 1),
                 f"config key 'mesh.{axis}' is {size!r}; it must be -1 (fill) or >= 1")
    _require(config.mesh.expert == -1 or routed % config.mesh.expert == 0,
             f"mesh.expert ({config.mesh.expert}) must divide the routed experts ({routed} = "
             f"moe.num_experts - moe.num_shared_experts): each device holds the same number")
    for name in known.mesh.rules.keys():
        _require(name in config.mesh.rules, f"config key 'mesh.rules.{name}' is missing")
    for name, target in config.mesh.rules.items():
        _require(name in known.mesh.rules, f"unknown config key 'mesh.rules.{name}'; valid: "
                 f"{', '.join(sorted(known.mesh.rules.keys()))}")
        for axis in filter(None, str(target).split(",")):
            _require(axis in ("data", "fsdp", "expert"), f"config key 'mesh.rules.{name}' is "
                     f"{target!r}; valid: '' or mesh axes among data, fsdp, expert (comma-joined)")
    return config


def _check_balance_groups(config):
    rows, micro = config.moe.balance_group_rows, config.train.micro_batches
    if rows == 0:
        return
    batch, scope = config.data.batch_size, config.moe.balance_scope
    _require(scope == "global", f"moe.balance_group_rows ({rows}) replaces moe.balance_scope, "
             f"which must then stay 'global' (it is {scope!r}); set one or the other")
    per_micro = batch // micro
    _require(batch % rows == 0 and (per_micro % rows == 0 or rows % per_micro == 0),
             f"moe.balance_group_rows ({rows}) must divide data.batch_size ({batch}) and divide "
             f"or be a multiple of the rows of one micro-batch ({per_micro} = data.batch_size / "
             f"train.micro_batches)")


def _check_experts_per_layer(config):
    e, layers = config.moe, config.model.num_layers
    text = e.experts_per_layer
    if text == "":
        return
    valid = (f"'' or {layers} comma-separated counts (one per layer, shared experts included), "
             f"each in [{e.num_shared_experts + e.top_k}, {e.num_experts}] (moe.num_shared_experts"
             " + moe.top_k .. moe.num_experts), the largest equal to moe.num_experts")
    parts = str(text).split(",") if isinstance(text, str) else []
    ok = len(parts) == layers and all(p.strip().isdigit() for p in parts)
    counts = [int(p) for p in parts] if ok else []
    ok = ok and max(counts) == e.num_experts and all(
        e.num_shared_experts + e.top_k <= n <= e.num_experts for n in counts)
    _require(ok, f"config key 'moe.experts_per_layer' is {text!r}; it must be {valid}")


def routed_experts(config: ml_collections.ConfigDict) -> int:
    """R: experts chosen by the router (the shared ones excluded)."""
    return config.moe.num_experts - config.moe.num_shared_experts
