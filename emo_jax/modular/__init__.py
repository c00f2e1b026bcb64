"""Modular use of a trained EMO model: keep only the experts a task needs (docs/METHOD.md §8).

  subset.py    the subset file (kept routed experts per layer, method, data, model shape):
               load / validate / save / compose, and refusal of another model's subset
  probe.py     an instrumented forward pass: router mass, per-token router distributions and
               Easy-EP scores of every layer, with an optional subset mask
  select.py    choosing a subset: layerwise (the reference greedy procedure), global, easy_ep,
               random
  extract.py   physical pruning into a standalone smaller model (config, weights, sizes)
  analysis.py  domain x expert usage maps, overlap of per-domain subsets, router clustering
  runtime.py   loading a checkpoint on one device; text to batches

The command-line tools are thin wrappers: `python -m emo_jax.select | extract | analyze |
generate` (and `emo_jax.eval --subset`). Decoding with a KV cache lives with the model, in
emo_jax/model/decode.py. Nothing here trains or changes a checkpoint in place.
"""
