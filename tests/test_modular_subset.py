"""The subset file: round trip, validation with one clear error, refusal of another model's
subset, and composition (per-layer union, evened out by score)."""

import json

import numpy as np
import pytest

from emo_jax.modular import subset as subset_lib

from modular_helpers import tiny_config

CONFIG = tiny_config()  # 2 layers, 9 experts: 1 shared + 8 routed


def make(layers, scores=None, method="global", config=CONFIG):
    shape = subset_lib.model_shape(config)
    s = subset_lib.Subset(layers=layers, keep=1 + len(layers[0]), shared_experts=1,
                          method=method, data={"text": method},
                          model={"shape": shape, "router_digest": "abc"}, scores=scores)
    return subset_lib.from_json(s.to_json())


def test_round_trip_and_mask(tmp_path):
    s = make([[1, 5, 6], [0, 2, 7]], scores=np.linspace(0, 1, 16).reshape(2, 8).tolist())
    path = subset_lib.save(s, str(tmp_path / "s.json"))
    loaded = subset_lib.load(path)
    assert loaded.layers == s.layers and loaded.keep == 4 and loaded.method == "global"
    np.testing.assert_allclose(loaded.scores, s.scores, rtol=1e-7)
    mask = loaded.mask()
    assert mask.shape == (2, 8) and mask.sum() == 6 and mask[0, 5] and not mask[0, 0]
    text = open(path).read()
    assert '"format": "emo_jax.subset"' in text and "[1, 5, 6]" in text


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(format="other"), "'format' must be"),
    (lambda o: o.update(format_version=7), "format_version"),
    (lambda o: o.pop("layers"), "'layers' is missing"),
    (lambda o: o["layers"].pop(), "each of the 2 layers"),
    (lambda o: o["layers"][1].pop(), "layer 1 lists 2 routed experts"),
    (lambda o: o["layers"][0].__setitem__(0, 8), r"in \[0, 8\)"),
    (lambda o: o["layers"][0].__setitem__(1, 1), "ascending, distinct"),
    (lambda o: o.update(keep=1), "'keep' is 1"),
    (lambda o: o.update(shared_experts=0), "'shared_experts' is 0"),
    (lambda o: o["model"].pop("shape"), "'model.shape' must hold"),
])
def test_malformed_files_get_one_clear_error(tmp_path, edit, message):
    obj = make([[1, 5, 6], [0, 2, 7]]).to_json()
    edit(obj)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(subset_lib.SubsetError, match=message):
        subset_lib.load(str(path))


def test_missing_and_non_json_files(tmp_path):
    with pytest.raises(subset_lib.SubsetError, match="does not exist"):
        subset_lib.load(str(tmp_path / "nope.json"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(subset_lib.SubsetError, match="not valid JSON"):
        subset_lib.load(str(tmp_path / "x.json"))


def test_subset_of_another_model_is_refused():
    s = make([[1, 5, 6], [0, 2, 7]])
    s.check_model(CONFIG)  # its own model: fine
    for other, key in ((tiny_config(num_experts=12, pool_max=8), "moe.num_experts=9 there but 12"),
                       (tiny_config(expert_hidden=16), "moe.expert_hidden=32 there but 16")):
        with pytest.raises(subset_lib.SubsetError, match=key):
            s.check_model(other)
    deeper = tiny_config()
    deeper.model.num_layers = 3
    with pytest.raises(subset_lib.SubsetError, match="model.num_layers=2 there but 3"):
        s.check_model(deeper)


@pytest.mark.parametrize("keep", [0, 1, 10])
def test_bad_keep(keep):
    with pytest.raises(subset_lib.SubsetError, match=r"K=.* 2 <= K <= 9"):
        subset_lib.check_keep(keep, CONFIG)


def test_compose_is_the_union_evened_out_by_score():
    a_scores = [[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8]]
    b_scores = [[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 2, 3, 4]]
    a = make([[0, 1, 2], [5, 6, 7]], scores=a_scores, method="layerwise")
    b = make([[5, 6, 7], [5, 6, 7]], scores=b_scores, method="easy_ep")
    ab = subset_lib.compose([a, b], names=["a.json", "b.json"])
    # Layer 0: union of 6; layer 1: union of 3, filled with the 3 best remaining by the mean of
    # the normalised scores (4, 3, then 2).
    assert ab.layers == [[0, 1, 2, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    assert ab.filled == [[], [2, 3, 4]] and ab.keep == 7 and ab.method == "compose"
    assert [c["method"] for c in ab.components] == ["layerwise", "easy_ep"]
    with pytest.raises(subset_lib.SubsetError, match="different shapes"):
        subset_lib.compose([a, make([[1], [2]], config=tiny_config(expert_hidden=16))])
