"""Tiny byte-level EMO model that trains end to end on one CPU in a few minutes.

    python -m emo_jax.train --config=configs/tiny.py --workdir=/tmp/emo_tiny

About 0.46M parameters (0.11M active): 2 layers of d_model 64, 16 experts per layer (1 shared
+ 15 routed, top-2),
document pools of 4..15 experts, 128-byte rows, batch 16, 300 steps of AdamW 3e-3 on the
bundled corpus (see emo_jax/data/corpus). The loss falls from ~5.6 (uniform over 264 ids) to
well under 3 nats per byte.
"""

from emo_jax.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 16
    c.moe.num_experts = 16
    c.moe.num_shared_experts = 1
    c.moe.top_k = 2
    c.moe.expert_hidden = 64
    c.moe.pool_min = 4
    c.moe.pool_max = 15
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.train.steps = 300
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.log_every = 10
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    return c
