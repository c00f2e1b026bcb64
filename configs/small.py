"""A bigger CPU config: the small-scale replication setup (docs/RESULTS.md §1; about 20 minutes
on 2 cores).

    python -m emo_jax.train --config=configs/small.py --workdir=/tmp/emo_small

Byte-level, d_model 128, 4 layers, 32 routed experts of hidden 128, top-4, document pools of
6..32 experts, 256-byte rows, batch 16, AdamW 3e-3, 1,000 steps on the bundled corpus. The
standard-MoE twin of the same size: add `--config.moe.pool=none`.
"""

from emo_jax.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.moe.num_experts = 32
    c.moe.num_shared_experts = 0
    c.moe.top_k = 4
    c.moe.expert_hidden = 128
    c.moe.pool_min = 6  # 4 (= top_k) before: a lower tax, the same subsets (docs/RESULTS.md §10)
    c.moe.pool_max = 32
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.train.steps = 1000
    c.train.lr = 3e-3
    c.train.warmup_steps = 50
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.log_every = 10
    c.checkpoint.every = 200
    c.checkpoint.keep = 3
    return c
