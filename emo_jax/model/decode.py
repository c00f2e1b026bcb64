"""Autoregressive decoding with a fixed-size KV cache: prefill, jitted one-token steps, sampling.

The cache is a `KVCache` (`k`, `v` arrays [L, B, T, K, Dh] in the compute dtype), T fixed when it is
made (prompt + new tokens), so every step runs the same compiled program and its cost does not
grow with the generated length beyond attention over the T cache slots. Rows are independent
documents that share one prompt length (no padding inside the cache).

Inference routing is plain top-k (no document pool); `expert_mask_LR` restricts the experts to a
subset by masking, and a physically extracted model (emo_jax/modular/extract.py) decodes with
only its experts. Every prefill and step also returns the routed assignments per layer, row and
expert of the tokens it processed, which `generate(..., return_routing=True)` sums per row over
the tokens of the request (for request logs).

Glossary: B rows, P prompt length, T cache slots, L layers, K key/value heads, Dh head dim,
V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import KVCache


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty KV cache of `length` slots for `batch` rows."""
    return KVCache.empty(config, batch, length)


def sample_token(logits_BV, key, temperature: float, top_p: float):
    """int32 [B]: argmax when temperature <= 0; else a draw from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches top_p (nucleus)."""
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token is kept when the mass strictly before it is below top_p (the first always is).
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# Compiled decoders by (model config, sampling): models of one config share a graph structure,
# so a process compiles the prefill and the step once per config, not once per call.
_COMPILED = {}


class Decoder:
    """The jitted prefill and one-token step of one model."""

    def __init__(self, model, *, temperature: float = 0.0, top_p: float = 1.0):
        self.config = model.config
        graphdef, self.state = nnx.split(model)
        key = (model.config, float(temperature), float(top_p))
        if key not in _COMPILED:
            _COMPILED[key] = _build(graphdef, float(temperature), float(top_p))
        self.prefill, self.step = _COMPILED[key]


def _build(graphdef, temperature: float, top_p: float):
    """(prefill, step), jitted, of a graph structure; the cache argument is donated.

    Both run the model's one forward with the cache; each returns (next token, its logits, the
    updated cache, counts_LBR: the routed assignments per layer, row and expert made for the
    tokens it read).
    """
    sampling = dict(temperature=temperature, top_p=top_p)

    def prefill(state, tokens_BP, cache, expert_mask_LR, key):
        out = nnx.merge(graphdef, state)(tokens_BP, cache=cache, cache_index=0,
                                         expert_mask_LR=expert_mask_LR)
        logits_BV = out.logits_BSV[:, -1]
        token_B = sample_token(logits_BV, key, **sampling)
        return token_B, logits_BV, out.cache, out.routing.counts_BR

    def step(state, token_B, position, cache, expert_mask_LR, key):
        out = nnx.merge(graphdef, state)(token_B[:, None], cache=cache, cache_index=position,
                                         expert_mask_LR=expert_mask_LR)
        logits_BV = out.logits_BSV[:, 0]
        token_B = sample_token(logits_BV, key, **sampling)
        return token_B, logits_BV, out.cache, out.routing.counts_BR

    return (jax.jit(prefill, donate_argnames=("cache",)),
            jax.jit(step, donate_argnames=("cache",)))


def generate(model, prompt_BP, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, expert_mask_LR=None, eos_id: int | None = None,
             return_logits: bool = False, return_routing: bool = False):
    """New tokens after each prompt row: int32 [B, N], N <= max_new_tokens.

    Decoding stops early once every row has produced `eos_id` (rows that finished earlier are
    padded with eos_id). With `return_logits`, also the float32 [B, N, V] logits each token was
    drawn from. With `return_routing`, also {'counts_BLR': int64 routed assignments per row,
    layer and expert, 'tokens_B': tokens processed per row} over the tokens the model read for
    each row: its prompt and every generated token it was fed before the row ended (a row
    ends when it produces eos_id; eos and what follows are not read for it).
    """
    prompt_BP = jnp.asarray(np.asarray(prompt_BP, np.int32).reshape(len(prompt_BP), -1))
    b, p = prompt_BP.shape
    if p == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; it must be >= 1")
    decoder = Decoder(model, temperature=temperature, top_p=top_p)
    cache = init_cache(model.config, b, p + max_new_tokens)
    mask = None if expert_mask_LR is None else jnp.asarray(expert_mask_LR, bool)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    token_B, logits_BV, cache, counts_LBR = decoder.prefill(decoder.state, prompt_BP, cache,
                                                            mask, keys[0])
    tokens, logits = [token_B], [logits_BV]
    counts_BLR = np.rint(np.asarray(counts_LBR)).astype(np.int64).swapaxes(0, 1)
    tokens_B = np.full(b, p, np.int64)
    done_B = np.zeros(b, bool)
    for i in range(1, max_new_tokens):
        if eos_id is not None:
            done_B |= np.asarray(token_B) == eos_id
            if done_B.all():
                break
        token_B, logits_BV, cache, counts_LBR = decoder.step(decoder.state, token_B, p + i - 1,
                                                             cache, mask, keys[i])
        if return_routing:  # the token fed counts for the rows not ended by it or before
            live_B = ~done_B
            step_BLR = np.rint(np.asarray(counts_LBR)).astype(np.int64).swapaxes(0, 1)
            counts_BLR += step_BLR * live_B[:, None, None]
            tokens_B += live_B
        tokens.append(token_B)
        logits.append(logits_BV)
    out_BN = np.stack([np.asarray(t) for t in tokens], axis=1)
    if eos_id is not None:  # everything after a row's first eos is eos
        after_BN = np.cumsum(out_BN == eos_id, axis=1) - (out_BN == eos_id) > 0
        out_BN = np.where(after_BN, eos_id, out_BN)
    result = (out_BN,)
    if return_logits:
        result += (np.stack([np.asarray(x) for x in logits], axis=1),)
    if return_routing:
        result += ({"counts_BLR": counts_BLR, "tokens_B": tokens_B},)
    return result if len(result) > 1 else out_BN
