"""Decoding with the KV cache: the same tokens and logits as recomputing the whole prefix at
every step, a step compiled once for every length, nucleus sampling, and subsets."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.model import decode
from emo_jax.modular import extract, select

from modular_helpers import random_model, tiny_config

PROMPT = [[30, 31, 32, 33, 34, 35, 36]]
NEW = 12  # every call decodes into a cache of 7 + 12 slots: one compiled step per model/sampling


def spread_config():
    # A larger init spreads the logits, so greedy decoding does not repeat one token.
    config = tiny_config()
    config.model.init_std = 0.3
    return config


@pytest.fixture(scope="module")
def model():
    return random_model(spread_config(), 11)


@nnx.jit
def _logits(model, tokens_1S, segment_ids_1S, mask_LR):
    positions = jnp.arange(tokens_1S.shape[1])[None] * segment_ids_1S
    return model(tokens_1S, segment_ids_1S, positions, expert_mask_LR=mask_LR).logits_BSV[0]


def recompute_greedy(model, prompt, steps, mask_LR=None, width=32):
    """Greedy decoding by running the whole prefix through the model at every step (in a row
    of fixed width, padding after the prefix, so one compiled forward serves every step)."""
    seq, out, logits = list(prompt), [], []
    for _ in range(steps):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        segments = (np.arange(width) < len(seq)).astype(np.int32)[None]
        last = _logits(model, jnp.asarray(tokens), jnp.asarray(segments), mask_LR)[len(seq) - 1]
        out.append(int(jnp.argmax(last)))
        logits.append(np.asarray(last))
        seq.append(out[-1])
    return out, np.stack(logits)


def test_kv_cache_greedy_equals_recomputing_the_prefix(model):
    tokens, logits = decode.generate(model, PROMPT, max_new_tokens=NEW, return_logits=True)
    ref_tokens, ref_logits = recompute_greedy(model, PROMPT[0], NEW)
    assert tokens[0].tolist() == ref_tokens
    assert len(set(ref_tokens)) > 3  # a real sequence, not one repeated token
    np.testing.assert_allclose(logits[0], ref_logits, rtol=1e-4, atol=1e-4)


def test_one_compiled_step_serves_every_length(model):
    decoder = decode.Decoder(model)
    before = decoder.step._cache_size()
    # 11 + 15 steps at positions 7..17 and 3..17, one cache size (7 + 12 = 3 + 16): the
    # position is an argument of the step, never a shape, so the step compiles at most once.
    decode.generate(model, PROMPT, max_new_tokens=NEW)
    decode.generate(model, [PROMPT[0][:3]], max_new_tokens=NEW + 4)
    assert decoder.step._cache_size() - before <= 1


def test_subset_by_mask_decodes_like_the_extracted_model(model):
    subset = select.select(model, [], 3, "random", seed=4)
    masked = decode.generate(model, PROMPT, max_new_tokens=NEW, expert_mask_LR=subset.mask())
    small, _, _ = extract.extract(model, spread_config(), subset)
    assert decode.generate(small, PROMPT, max_new_tokens=NEW).tolist() == masked.tolist()
    assert masked.tolist() != decode.generate(model, PROMPT, max_new_tokens=NEW).tolist()


def test_sampling_is_seeded_and_stops_at_eos(model):
    sampling = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9)
    a = decode.generate(model, PROMPT, seed=3, **sampling)
    assert a.tolist() == decode.generate(model, PROMPT, seed=3, **sampling).tolist()
    assert a.tolist() != decode.generate(model, PROMPT, seed=4, **sampling).tolist()
    greedy = decode.generate(model, PROMPT, max_new_tokens=NEW)
    eos = int(greedy[0, 2])
    stopped = decode.generate(model, PROMPT, max_new_tokens=NEW, eos_id=eos)
    first = greedy[0].tolist().index(eos)
    assert stopped[0].tolist() == greedy[0, :first + 1].tolist()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 300)

    def draws(temperature, top_p):
        sample = jax.jit(jax.vmap(lambda k: decode.sample_token(logits, k, temperature, top_p)))
        return collections.Counter(np.asarray(sample(keys))[:, 0].tolist())

    assert set(draws(1.0, 0.75)) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert set(draws(1.0, 0.45)) == {0}
    assert set(draws(1.0, 1.0)) == {0, 1, 2, 3}
    assert set(draws(0.0, 1.0)) == {0}
