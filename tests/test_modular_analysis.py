"""Analysis numbers against hand computations: purity, NMI, spherical k-means, the embedding,
the Jaccard overlap of per-domain subsets. (The files `analyze` writes for a trained checkpoint
are checked end to end in test_modular_cli.py.)"""

import numpy as np

from emo_jax.modular import analysis


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
