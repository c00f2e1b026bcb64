"""Analysis numbers against hand computations: purity, NMI, spherical k-means, the embedding,
the Jaccard overlap of per-domain subsets, document-level clustering and document features
against a NumPy reference of the model, and `analyze` end to end on a tiny random model. (The
files `analyze` writes for a trained checkpoint are checked through the CLI in
test_modular_cli.py.)"""

import json
import os

import numpy as np
import pytest

from emo_jax.modular import analysis, runtime

from modular_helpers import random_model, reference_forward, tiny_config

TEXTS = {  # per domain, documents of different lengths (seq_len of tiny_config is 48)
    "code": ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i * i)\n"
             "    if i > 5:\n        break\n", "import os"],
    "law": ["The court held that the contract was void.", "Section 2(b) applies.",
            "The tenant shall pay rent monthly, in advance, to the landlord named above."],
    "prose": ["It was a cold bright day in April.", "She walked home slowly.",
              "The rain had stopped, and the garden smelled of wet earth and roses."],
}


def entropy(counts):
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return -np.sum(p * np.log(p))


def test_purity_and_nmi_equal_a_hand_computation():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2])
    # Cluster 0 = {0, 0}, cluster 1 = {0, 1, 1, 2}, cluster 2 = {2, 2, 2}: majorities 2 + 2 + 3.
    assert analysis.purity(truth, pred) == 7 / 9
    joint = np.zeros((3, 3))
    np.add.at(joint, (truth, pred), 1)
    mutual = entropy(np.bincount(truth)) + entropy(np.bincount(pred)) - entropy(joint.ravel())
    expected = mutual / ((entropy(np.bincount(truth)) + entropy(np.bincount(pred))) / 2)
    np.testing.assert_allclose(analysis.nmi(truth, pred), expected, rtol=1e-12)
    assert analysis.purity(truth, truth) == 1.0 and analysis.nmi(truth, truth) == 1.0


def test_spherical_kmeans_finds_directions_not_magnitudes():
    rng = np.random.default_rng(0)
    directions = np.eye(3) * 4 + 1
    labels = np.repeat(np.arange(3), 40)
    # Very different norms along one direction: k-means on raw vectors would split by length.
    x = directions[labels] * rng.uniform(0.1, 10, (120, 1)) + 0.05 * rng.standard_normal((120, 3))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    found, centres = analysis.spherical_kmeans(unit, 3, seed=1)
    assert analysis.purity(labels, found) == 1.0 and analysis.nmi(labels, found) == 1.0
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, rtol=1e-9)
    # k larger than the number of points is clamped.
    assert len(set(analysis.spherical_kmeans(unit[:2], 5)[0])) <= 2


def test_embedding_is_centred_reduced_and_unit_length():
    rng = np.random.default_rng(1)
    feats = rng.random((50, 12)) + 5.0
    emb = analysis.embed_tokens(feats, pca_dims=4)
    centred = feats - feats.mean(0)
    ref = centred @ np.linalg.svd(centred, full_matrices=False)[2][:4].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    signs = np.sign(np.sum(emb * ref, axis=0))  # a principal axis is defined up to sign
    np.testing.assert_allclose(emb * signs, ref, atol=1e-8)


def test_jaccard_of_per_domain_subsets():
    mass = np.zeros((2, 2, 6))
    mass[0, 0, [0, 1, 2]] = 1  # layer 0: {0,1,2} vs {1,2,3}: 2/4
    mass[1, 0, [1, 2, 3]] = 1
    mass[0, 1, [4, 5, 0]] = 1  # layer 1: identical
    mass[1, 1, [4, 5, 0]] = 1
    jac = analysis.jaccard_matrix(mass, 3)
    np.testing.assert_allclose(jac, [[1, 0.75], [0.75, 1]])


def test_document_clusters_follow_domains_that_share_a_direction():
    """Documents given as router distributions (two layers, eight experts) scattered around one
    preferred distribution per domain: one cluster per domain, chance far below."""
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    preferred_DLR = rng.dirichlet(np.full(8, 0.3), size=(4, 2))
    domain_N = np.repeat(np.arange(4), 10)
    features_NF = np.stack([np.concatenate([rng.dirichlet(60 * p_R + 0.1) for p_R in
                                            preferred_DLR[d]]) for d in domain_N])
    labels = [names[d] for d in domain_N]
    emb_NP, cluster_N, found_N, scores = analysis.cluster_points(
        features_NF, np.arange(len(labels)), labels, names, len(names), pca_dims=50, seed=0)
    np.testing.assert_array_equal(found_N, domain_N)
    assert emb_NP.shape == (40, 16) and len(set(cluster_N.tolist())) == 4
    assert scores["purity"] == pytest.approx(1.0) and scores["nmi"] > 0.95
    assert scores["purity_shuffled"] < 0.6 and scores["nmi_shuffled"] < 0.3
    assert scores["majority_share"] == 0.25
    # Unlabelled documents are left out of the scores; one labelled domain gives none.
    labels[0] = analysis.UNLABELLED
    _, _, _, no_scores = analysis.cluster_points(features_NF[:10], np.arange(10), labels,
                                                 names + [analysis.UNLABELLED], 2)
    assert no_scores == {}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), 5)


def test_document_feature_is_the_mean_of_its_token_features(model):
    """Against the float64 NumPy reference of the model, document by document; one document is
    longer than the cap, one is empty (left out), and batches of 2 split the documents."""
    docs = [{"text": t, "domain": d} for d, ts in TEXTS.items() for t in ts[:2]]
    docs.insert(3, {"text": "", "domain": "law"})
    tokenizer = runtime.tokenizer_of(tiny_config())
    cap = 30
    features_MF, doc_M = analysis.document_features(model, docs, tokenizer, max_tokens=cap,
                                                     batch_size=2)
    np.testing.assert_array_equal(doc_M, [0, 1, 2, 4, 5, 6])
    assert max(len(tokenizer.encode(d["text"])) for d in docs) > cap
    for feature_F, i in zip(features_MF, doc_M):
        probs_LSR, _, _ = reference_forward(model, tokenizer.encode_array(docs[i]["text"])[:cap])
        np.testing.assert_allclose(feature_F, probs_LSR.mean(1).reshape(-1), rtol=1e-4,
                                   atol=1e-6)
    # Exactly the average of the token level's features of each document (same batches).
    token_NF, owner_N = analysis.token_features(model, docs, tokenizer, first_tokens=cap,
                                                batch_size=2)
    np.testing.assert_allclose(features_MF, [token_NF[owner_N == i].mean(0) for i in doc_M],
                               rtol=1e-12)


def test_analyze_writes_both_clustering_levels(model, tmp_path):
    docs = [{"text": t, "domain": d} for d, ts in TEXTS.items() for t in ts]
    out = str(tmp_path / "analysis")
    summary = analysis.analyze(model, tiny_config(), docs, out, clusters=4, pca_dims=8,
                               first_tokens=20,
                               source="texts")
    assert {"clusters.png", "doc_clusters.png", "tokens.npz", "documents.npz",
            "analysis.json", "report.md"} <= set(os.listdir(out))
    with open(os.path.join(out, "analysis.json")) as f:
        assert json.load(f) == summary
    assert summary["doc_clusters"] <= 3 and summary["cluster_documents"] == 9
    assert summary["doc_tokens"] == tiny_config().data.seq_len
    assert sum(summary["doc_cluster_sizes"]) == 9
    points = np.load(os.path.join(out, "documents.npz"))
    np.testing.assert_array_equal(points["document"], np.arange(9))
    np.testing.assert_array_equal(points["domain"], np.repeat(np.arange(3), 3))
    truth, pred = points["domain"], points["cluster"]
    assert summary["doc_purity"] == analysis.purity(truth, pred)
    assert summary["doc_nmi"] == analysis.nmi(truth, pred)
    assert {"doc_purity_shuffled", "doc_nmi_shuffled", "purity", "nmi", "purity_shuffled",
            "nmi_shuffled"} <= set(summary)
    report = open(os.path.join(out, "report.md")).read()
    assert f"| documents | {summary['doc_purity']:.3f} | {summary['doc_nmi']:.3f} |" in report
    assert f"| tokens | {summary['purity']:.3f} | {summary['nmi']:.3f} |" in report
    assert "![document clusters](doc_clusters.png)" in report
    # A chosen k and cap.
    summary = analysis.analyze(model, tiny_config(), docs, out, clusters=4, pca_dims=8,
                               first_tokens=20,
                               doc_clusters=2, doc_tokens=10)
    assert summary["doc_clusters"] == 2 and summary["doc_tokens"] == 10
