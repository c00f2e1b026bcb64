"""The reference EMO recipe (docs/METHOD.md §5): about 14B parameters, about 1B active.

    python -m emo_jax.train --config=configs/emo_1b14b.py --workdir=/shared/emo_1b14b \\
        --config.data.train_sources=PATH_OR_SPEC \\
        --config.data.tokenizer=hf:PATH/TO/dolma2-tokenizer/tokenizer.json

(on every host of a pod; see launch/). 16 layers, d_model 2048, 16 heads of 128 (no GQA, no
QK-norm), RMSNorm eps 1e-6, RoPE theta 500,000; 128 experts per layer = 127 routed + 1 shared,
top-7 routed (8 active per token), SwiGLU hidden 1024; vocabulary 100,278 padded to 100,352,
untied embeddings. AdamW 4e-3, betas (0.9, 0.95), weight decay 0.1 (none on embeddings), clip
1.0, 2,000 warm-up steps, cosine to 0.1 x peak over 1T tokens (238,419 steps); the reference's
final linear anneal to 0 is a separate phase: rerun with `--config.train.anneal_steps=N`
(and the anneal data) from the end of this one. Batch 1,024 x 4,096 tokens, document pools
uniform over 8..128 experts, load balance over groups of 512 rows (`moe.balance_group_rows`:
the reference's lb_global_batch_size, 4 rows x 128 GPUs; two strided groups per step,
independent of the 8 micro-batches), eos opening every document with the eos -> next-document
target trained (`data.boundary='eos_opens'`), every matrix initialised from a normal truncated
at +-3 std (`model.init`), as the reference; bfloat16 compute, float32 parameters and
optimiser state.

Layout: 127 routed experts is a prime number, so expert parallelism cannot split them; the
parameters are fully sharded over all devices ('fsdp'), 8 micro-batches of 128 rows per step,
full rematerialisation, memory-efficient attention and the output head fused with the
cross-entropy over 512-position chunks. `python -m emo_jax.plan --config=configs/emo_1b14b.py
--topology=v5p-128` tells whether a pod fits before launch (docs/RESULTS.md §3.2 has v5p-16 to
v5p-256 and v6e-256). Adjust `mesh.*`, `train.micro_batches` and `model.remat` to the pod
(`python -m emo_jax.summary --config=configs/emo_1b14b.py` prints the sizes).
"""

from emo_jax.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    m = c.model
    m.vocab_size = 100_352
    m.d_model = 2048
    m.num_layers = 16
    m.num_heads = 16
    m.num_kv_heads = 16
    m.head_dim = 128
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-6
    m.qk_norm = False
    m.compute_dtype = "bfloat16"
    m.remat = "full"
    m.attention = "auto"  # splash on TPU, chunked flash attention elsewhere at this length
    m.loss_chunk = 512  # the output head fused with the loss: no [tokens, 100k] float32 logits
    m.init = "truncated_normal"  # the reference: N(0, 0.02^2) cut at +-3 std
    e = c.moe
    e.num_experts = 128
    e.num_shared_experts = 1
    e.top_k = 7
    e.expert_hidden = 1024
    e.pool = "document"
    e.pool_min = 8
    e.pool_max = 128
    e.eval_pool = 0
    e.balance_weight = 0.1
    e.router_z_weight = 0.001
    e.balance_scope = "global"  # replaced by the groups below
    e.balance_group_rows = 512  # the reference's lb_global_batch_size (4 rows x 128 GPUs)
    d = c.data
    d.tokenizer = "hf:dolma2-tokenizer/tokenizer.json"
    d.seq_len = 4096
    d.batch_size = 1024
    d.packing = "concat_then_split"
    d.boundary = "eos_opens"  # the reference: eos opens a document, eos -> next doc trained
    d.worker_count = 4
    d.prefetch = 4
    t = c.train
    t.steps = 238_419
    t.lr = 4e-3
    t.b1, t.b2 = 0.9, 0.95
    t.weight_decay = 0.1
    t.clip_norm = 1.0
    t.warmup_steps = 2000
    t.schedule = "cosine"
    t.final_lr_fraction = 0.1
    t.anneal_steps = 0
    t.output_z_weight = 1e-5
    t.micro_batches = 8
    t.eval_every = 1000
    t.eval_batches = 16
    t.log_every = 10
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 1
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    return c
