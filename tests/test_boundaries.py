"""`data.boundary`: where eos sits at a document boundary and which positions are predicted.

'eos_closes' (default): every document ends with eos inside its own segment, and a segment's
last token predicts nothing. 'eos_opens' (the reference): every document starts with eos, and a
segment's last token predicts the next segment's first token (an eos) when one follows in the
row. Checked on hand-made packed rows, on the packer's rows, and in the train and eval losses.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from emo_jax.config import ConfigError, default_config, validate
from emo_jax.data import packing
from emo_jax.data.pipeline import pack_documents
from emo_jax.data.tokenizers import ByteTokenizer
from emo_jax.model import losses
from emo_jax.model.model_config import ModelConfig
from emo_jax.model.transformer import Transformer
from emo_jax.train import step as step_lib
from emo_jax.train.loss import loss_and_metrics

EOS = 2


def _row_batch():
    """Two hand-made rows. Row 0: doc 'ab' and doc 'cde', then padding. Row 1: the last piece
    'fg' of a split document (no eos), doc 'h', then the last piece 'ij' of another split
    document (first_fit places such pieces anywhere)."""
    a, b, c, d, e, f, g, h, i, j = range(10, 20)
    closes = {"tokens": [[a, b, EOS, c, d, e, EOS, 0], [f, g, EOS, h, EOS, i, j, EOS]],
              "segment_ids": [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 2, 2, 3, 3, 3]]}
    opens = {"tokens": [[EOS, a, b, EOS, c, d, e, 0], [f, g, EOS, h, i, j, 0, 0]],
             "segment_ids": [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 3, 3, 0, 0]]}
    return ({k: np.asarray(v, np.int32) for k, v in closes.items()},
            {k: np.asarray(v, np.int32) for k, v in opens.items()})


def test_targets_on_hand_made_rows():
    closes, opens = _row_batch()
    _, mask = losses.next_token_targets(closes["tokens"], closes["segment_ids"])
    np.testing.assert_array_equal(np.asarray(mask, int), [[1, 1, 0, 1, 1, 1, 0, 0],
                                                          [1, 1, 0, 1, 0, 1, 1, 0]])
    targets, mask = losses.next_token_targets(opens["tokens"], opens["segment_ids"], EOS)
    # Across a segment boundary when a document opens there: 'b' -> eos (doc 'ab' ends),
    # 'g' -> eos; not 'h' -> 'i' (a continuation piece follows); the last real token of a row
    # predicts nothing.
    np.testing.assert_array_equal(np.asarray(mask, int), [[1, 1, 1, 1, 1, 1, 0, 0],
                                                          [1, 1, 1, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(targets)[0, :6], opens["tokens"][0, 1:7])


def test_tokenize_puts_eos_first_or_last():
    tok = ByteTokenizer()
    ids = list(tok.encode_array("ab"))
    assert list(packing.TokenizeDocument(tok)({"text": "ab"})["tokens"]) == ids + [EOS]
    assert list(packing.TokenizeDocument(tok, "eos_opens")({"text": "ab"})["tokens"]) == (
        [EOS] + ids)
    with pytest.raises(ValueError):
        packing.TokenizeDocument(tok, "bos")


@pytest.mark.parametrize("mode", ["first_fit", "concat_then_split"])
def test_packed_rows_eos_opens_every_document(mode):
    texts = [f"doc{i} " + "x" * (i * 7 % 23) for i in range(12)]
    tok = ByteTokenizer()
    batches = list(pack_documents(texts, tok, 16, 4, packing=mode, boundary="eos_opens"))
    predicted = 0
    for batch in batches:
        tokens, seg, doc = batch["tokens"], batch["segment_ids"], batch["document_ids"]
        _, mask = losses.next_token_targets(tokens, seg, EOS)
        mask = np.asarray(mask)
        predicted += mask.sum()
        for r in range(tokens.shape[0]):
            for s in range(tokens.shape[1]):
                starts = seg[r, s] != 0 and (s == 0 or seg[r, s - 1] != seg[r, s])
                if starts and s > 0:  # the previous document predicts an opening eos only
                    assert doc[r, s] != doc[r, s - 1]
                    assert mask[r, s - 1] == (tokens[r, s] == EOS)
                if starts and tokens[r, s] != EOS:  # the continuation of a split document
                    assert mode == "first_fit" or s == 0
    # A document's tokens are all predicted but its last, unless an opening eos follows it.
    opened = sum(int(np.sum((b["tokens"] == EOS) & (np.arange(16) > 0))) for b in batches)
    total = sum(len(t.encode()) + 1 for t in texts)
    pieces = sum(int(np.sum((b["segment_ids"] != 0) & (b["positions"] == 0))) for b in batches)
    assert predicted == total - pieces + opened


def _tiny(boundary):
    c = default_config()
    c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 2
    c.model.num_kv_heads, c.model.head_dim = 2, 16
    c.moe.num_experts, c.moe.top_k, c.moe.expert_hidden = 8, 2, 16
    c.moe.pool_min = c.moe.pool_max = 4
    c.data.boundary = boundary
    return validate(c)


def test_train_and_eval_losses_predict_the_same_positions():
    _, opens = _row_batch()
    batch = dict(opens, positions=np.zeros_like(opens["tokens"]))  # positions do not matter
    for boundary, want in (("eos_closes", 8), ("eos_opens", 10)):
        config = _tiny(boundary)
        model = Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0))
        _, metrics = loss_and_metrics(model, batch, config, jax.random.key(0))
        sums = step_lib.eval_sums(model, batch, config)
        assert float(metrics["predicted_tokens"]) == want
        assert float(sums["predicted"].sum()) == want


def test_boundary_is_validated():
    c = default_config()
    c.data.boundary = "eos_first"
    with pytest.raises(ConfigError, match="data.boundary"):
        validate(c)


def test_tools_open_documents_and_prompts_with_eos_for_eos_opens_models():
    """Calibration batches, prompts and lm-eval contexts of an 'eos_opens' model start with eos,
    as its training documents did; an 'eos_closes' model's do not."""
    from emo_jax.lm_eval_adapter import Scorer
    from emo_jax.modular import runtime

    tok = ByteTokenizer()
    assert runtime.prompt_ids(tok, "ab", "eos_opens") == [tok.eos_id] + list(tok.encode("ab"))
    assert runtime.prompt_ids(tok, "ab") == list(tok.encode("ab"))
    for boundary, first in (("eos_opens", tok.eos_id), ("eos_closes", tok.encode("x")[0])):
        batch = runtime.document_batches([{"text": "xy"}, {"text": "xz"}], tok, 16, 2,
                                         boundary)[0]
        starts = np.flatnonzero(np.diff(batch["segment_ids"][0], prepend=0) > 0)
        assert len(starts) == 2 and all(batch["tokens"][0, s] == first for s in starts)
    model = Transformer(ModelConfig.from_config(_tiny("eos_opens")), rngs=nnx.Rngs(0))
    opens = Scorer(model, tok, seq_len=16, boundary="eos_opens")
    closes = Scorer(model, tok, seq_len=16)
    assert opens.encode_pair("ab", " c") == ([tok.eos_id] + list(tok.encode("ab")),
                                             list(tok.encode(" c")))
    assert closes.encode_pair("ab", " c") == (list(tok.encode("ab")), list(tok.encode(" c")))
