"""Which experts serve which domains: usage heat maps, subset overlap, router clustering.

`analyze(model, docs, out_dir)` writes into `out_dir`:

  usage_layer_XX.png   per layer, a domain x expert heat map of routed-expert usage: the share
                       of the domain's top-k assignments that went to each expert (rows sum
                       to 1), over every token of every document
  jaccard.png          per pair of domains, the Jaccard overlap |A n B| / |A u B| of the subsets
                       each domain would keep (one-pass router mass, `keep` experts, averaged
                       over layers; routed experts only, the shared ones are in every subset)
  clusters.png         the token embeddings of the clustering (first two principal components)
                       coloured by domain and by cluster
  doc_clusters.png     the same for the document embeddings
  analysis.json        every number behind the pictures
  tokens.npz           per clustered token: `cluster`, `domain` (index into analysis.json's
                       `domains`), `document` (index of its document), `xy` (the two
                       coordinates plotted)
  documents.npz        the same per clustered document
  report.md            a short report that embeds the pictures

Clustering (docs/METHOD.md §8.4), at two levels through one pipeline:

  tokens     the router softmax of the first `first_tokens` tokens of each document, all layers
             concatenated ([L*R] per token)
  documents  per document, the mean of its tokens' router softmax over its first `doc_tokens`
             tokens (default: the model's `data.seq_len`, i.e. the whole document up to one
             training context), all layers concatenated ([L*R] per document); documents
             without tokens are left out

The points are mean-centred, reduced by PCA, L2-normalised and clustered by spherical k-means
(cosine similarity to unit centroids; k-means++ seeding from scikit-learn, best of `n_init`
runs), k=`clusters` for tokens and k=`doc_clusters` (default: the number of domains) for
documents. Cluster purity and normalised mutual information (scikit-learn's NMI, arithmetic
normalisation) against the documents' `domain` labels measure whether routing is organised by
topic; the same scores of randomly permuted cluster labels are the chance level. Documents
without a domain are left out of purity/NMI. A single token can be routed by its surface form
(a space, a digit) while the document's average routing still identifies its topic: the two
levels tell these apart.

Both levels see each document from its start, one document per row (`leading_tokens_batches`),
with inference routing (plain top-k, no pool), as the model is served.
"""

from __future__ import annotations

import json
import os

import numpy as np

from emo_jax.config import routed_experts
from emo_jax.modular import runtime
from emo_jax.modular.probe import Probe
from emo_jax.modular.select import top_experts
from emo_jax.modular.subset import check_keep

UNLABELLED = "(none)"


# ---------------------------------------------------------------------------- measurements


def domains_of(docs) -> list[str]:
    return [doc.get("domain") or UNLABELLED for doc in docs]


def domain_usage(model, docs, tokenizer, *, seq_len: int, batch_size: int = 8,
                 boundary: str = "eos_closes"):
    """(names, usage [Dom, L, R] assignment counts, mass [Dom, L, R] softmax sums,
    tokens [Dom]) over every token of `docs`, grouped by domain."""
    labels = domains_of(docs)
    names = sorted(set(labels))
    domain_of_doc = np.asarray([names.index(d) for d in labels])
    usage = np.zeros((len(names), model.config.num_layers, model.config.routed_experts))
    mass = np.zeros_like(usage)
    tokens = np.zeros(len(names))
    probe = Probe(model, token_probs=True, assignments=True)
    for batch in runtime.document_batches(docs, tokenizer, seq_len, batch_size, boundary):
        out = probe(batch)
        real_BS = batch["segment_ids"] != 0
        dom_T = domain_of_doc[batch["document_ids"][real_BS]]
        probs_LTR = out["probs_LBSR"][:, real_BS].astype(np.float64)
        idx_LTK = out["expert_idx_LBSK"][:, real_BS]  # the router's picks, -1 = none
        for d in range(len(names)):
            sel = dom_T == d
            if not sel.any():
                continue
            tokens[d] += sel.sum()
            mass[d] += probs_LTR[:, sel].sum(1)
            for layer in range(model.config.num_layers):
                picks = idx_LTK[layer, sel].ravel()
                usage[d, layer] += np.bincount(picks[picks >= 0],
                                               minlength=model.config.routed_experts)
    return names, usage, mass, tokens


def _leading_token_probs(model, docs, tokenizer, length: int, batch_size: int):
    """Yields per batch of one document per row (its first `length` tokens): (router softmax
    [T, L*R] of the batch's real tokens, all layers concatenated; document index [T]), tokens
    in row-major order, so each document's tokens are contiguous."""
    probe = Probe(model, token_probs=True)
    for batch in runtime.leading_tokens_batches(docs, tokenizer, length, batch_size):
        probs_LBSR = probe(batch)["probs_LBSR"]
        real_BS = batch["segment_ids"] != 0
        probs_TLR = np.moveaxis(probs_LBSR[:, real_BS], 0, 1).astype(np.float64)
        yield probs_TLR.reshape(probs_TLR.shape[0], -1), batch["document_ids"][real_BS]


def token_features(model, docs, tokenizer, *, first_tokens: int = 100, batch_size: int = 16):
    """(features [N, L*R] router softmax per token, document index [N]) for the first
    `first_tokens` tokens of every document."""
    feats, owners = zip(*_leading_token_probs(model, docs, tokenizer, first_tokens, batch_size))
    return np.concatenate(feats), np.concatenate(owners)


def document_features(model, docs, tokenizer, *, max_tokens: int, batch_size: int = 8):
    """(features [M, L*R], document index [M]): for every document with at least one token, the
    mean router softmax over its first `max_tokens` tokens, all layers concatenated."""
    sums_NF = np.zeros((len(docs), model.config.num_layers * model.config.routed_experts))
    counts_N = np.zeros(len(docs))
    for probs_TF, owners_T in _leading_token_probs(model, docs, tokenizer, max_tokens,
                                                   batch_size):
        ids_G, starts_G, counts_G = np.unique(owners_T, return_index=True, return_counts=True)
        sums_NF[ids_G] += np.add.reduceat(probs_TF, starts_G, axis=0)
        counts_N[ids_G] += counts_G
    present_M = np.flatnonzero(counts_N)
    return sums_NF[present_M] / counts_N[present_M, None], present_M


def jaccard_matrix(mass, keep_routed: int) -> np.ndarray:
    """[Dom, Dom]: Jaccard overlap of the per-domain top-`keep_routed` experts, mean over
    layers (mass: [Dom, L, R] router mass per domain)."""
    n_dom, layers, _ = mass.shape
    kept = [[set(top_experts(mass[d, layer], keep_routed)) for layer in range(layers)]
            for d in range(n_dom)]
    out = np.zeros((n_dom, n_dom))
    for a in range(n_dom):
        for b in range(n_dom):
            out[a, b] = np.mean([len(kept[a][layer] & kept[b][layer]) /
                                 len(kept[a][layer] | kept[b][layer]) for layer in range(layers)])
    return out


# ---------------------------------------------------------------------------- clustering


def embed_tokens(features_NF, pca_dims: int = 50, seed: int = 0) -> np.ndarray:
    """Mean-centre, PCA to `pca_dims` (at most what the data allows), L2-normalise."""
    # Deferred: scikit-learn is heavy to import and only the clustering analysis needs it.
    from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top

    centred = features_NF - features_NF.mean(0, keepdims=True)
    dims = max(1, min(pca_dims, centred.shape[0] - 1, centred.shape[1]))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(centred)
    return reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x_ND, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100):
    """(labels [N], unit centroids [k, D]) maximising the summed cosine similarity of unit
    vectors to their centroid; k is clamped to the number of points."""
    # Deferred: scikit-learn is heavy to import and only the clustering analysis needs it.
    from sklearn.cluster import kmeans_plusplus  # pylint: disable=g-import-not-at-top

    k = max(1, min(k, x_ND.shape[0]))
    rng = np.random.default_rng(seed)
    best = (-np.inf, None, None)
    for _ in range(n_init):
        centres_KD, _ = kmeans_plusplus(x_ND, k, random_state=int(rng.integers(2**31 - 1)))
        centres_KD = _unit(centres_KD)
        labels = None
        for _ in range(max_iter):
            sim_NK = x_ND @ centres_KD.T
            new_labels = sim_NK.argmax(1)
            if labels is not None and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            sums_KD = np.zeros_like(centres_KD)
            np.add.at(sums_KD, labels, x_ND)
            empty = np.linalg.norm(sums_KD, axis=1) == 0
            sums_KD[empty] = centres_KD[empty]  # an emptied cluster keeps its centroid
            centres_KD = _unit(sums_KD)
        objective = float((x_ND @ centres_KD.T)[np.arange(len(labels)), labels].sum())
        if objective > best[0]:
            best = (objective, labels, centres_KD)
    return best[1], best[2]


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def purity(labels_true, labels_pred) -> float:
    """Share of points whose cluster's most common true label is their own."""
    # Deferred: scikit-learn is heavy to import and only the clustering analysis needs it.
    from sklearn.metrics.cluster import contingency_matrix  # pylint: disable=g-import-not-at-top

    table = contingency_matrix(labels_true, labels_pred)
    return float(table.max(axis=0).sum() / table.sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic mean of the entropies), scikit-learn's."""
    # Deferred: scikit-learn is heavy to import and only the clustering analysis needs it.
    from sklearn.metrics import normalized_mutual_info_score  # pylint: disable=g-import-not-at-top

    return float(normalized_mutual_info_score(labels_true, labels_pred))


def domain_scores(domain_N, cluster_N, labelled_N, seed: int = 0) -> dict:
    """Over the labelled points: purity and NMI of the clusters against the domains, the same of
    randomly permuted cluster labels (`*_shuffled`, the chance level) and the largest domain's
    share (`majority_share`, the purity of a single cluster); {} with fewer than two domains."""
    truth, pred = domain_N[labelled_N], cluster_N[labelled_N]
    if len(set(truth.tolist())) < 2:
        return {}
    chance = np.random.default_rng(seed).permutation(pred)
    return {"purity": purity(truth, pred), "nmi": nmi(truth, pred),
            "purity_shuffled": purity(truth, chance), "nmi_shuffled": nmi(truth, chance),
            "majority_share": float(np.bincount(truth).max() / len(truth))}


def cluster_points(features_NF, owners_N, labels, names, k: int, *, pca_dims: int = 50,
                   seed: int = 0):
    """Clusters points (tokens or documents; `owners_N` the document of each, `labels` the
    domain of each document) by the module's pipeline. Returns (embedding [N, P], cluster [N],
    domain [N] as an index into `names`, `domain_scores`)."""
    emb_NP = embed_tokens(features_NF, pca_dims, seed)
    cluster_N, _ = spherical_kmeans(emb_NP, k, seed=seed)
    domain_N = np.asarray([names.index(labels[i]) for i in owners_N])
    labelled_N = np.asarray([labels[i] != UNLABELLED for i in owners_N])
    return emb_NP, cluster_N, domain_N, domain_scores(domain_N, cluster_N, labelled_N, seed)


# ---------------------------------------------------------------------------- pictures


def _pyplot():
    # Deferred: matplotlib is heavy to import, and its backend must be chosen before pyplot.
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def plot_usage(path, share_DR, names, layer: int):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * share_DR.shape[1] + 2),
                                    max(2.0, 0.35 * len(names) + 1.2)))
    im = ax.imshow(share_DR, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed expert")
    ax.set_title(f"layer {layer}: expert usage by domain")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_jaccard(path, jac, names, keep: int):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.5 * len(names) + 3, 0.5 * len(names) + 2))
    im = ax.imshow(jac, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (a, b), v in np.ndenumerate(jac):
        ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 else "black")
    ax.set_title(f"Jaccard overlap of per-domain subsets (K={keep})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_clusters(path, emb_ND, domain_N, names, cluster_N, seed: int = 0, *,
                  what: str = "tokens", marker_size: float = 4):
    """Two scatter plots of the first two embedding coordinates of (at most 5000 of) the
    clustered `what` (tokens, documents): coloured by domain and by cluster."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    shown = rng.permutation(len(emb_ND))[:5000]
    xy = emb_ND[shown, :2] if emb_ND.shape[1] >= 2 else np.c_[emb_ND[shown, 0], 0 * shown]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for d, name in enumerate(names):
        sel = domain_N[shown] == d
        axes[0].scatter(xy[sel, 0], xy[sel, 1], s=marker_size, color=cmap(d % cmap.N),
                        label=name)
    axes[0].legend(markerscale=6 / marker_size ** 0.5, fontsize=7)  # legend markers: area 36
    axes[0].set_title(f"{what} by domain")
    axes[1].scatter(xy[:, 0], xy[:, 1], s=marker_size, c=cluster_N[shown], cmap="tab20")
    axes[1].set_title(f"{what} by cluster")
    for ax in axes:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- the report


def analyze(model, config, docs, out_dir: str, *, tokenizer=None, clusters: int = 32,
            keep: int | None = None, first_tokens: int = 100, pca_dims: int = 50,
            doc_clusters: int | None = None, doc_tokens: int | None = None,
            seed: int = 0, batch_size: int = 8, source: str = "") -> dict:
    """Writes the analysis files of `docs` ({'text', 'domain'} dicts) into `out_dir`; returns
    the summary that analysis.json holds. `config` is the model's run config (its tokenizer
    and `data.seq_len`). `doc_clusters` defaults to the number of domains, `doc_tokens` to
    `data.seq_len` (module docstring)."""
    tokenizer = tokenizer or runtime.tokenizer_of(config)
    e = config.moe
    routed = routed_experts(config)
    keep = keep or max(e.num_shared_experts + 1, e.num_experts // 4)
    check_keep(keep, config)
    os.makedirs(out_dir, exist_ok=True)

    names, usage, mass, tokens = domain_usage(model, docs, tokenizer,
                                              seq_len=config.data.seq_len,
                                              batch_size=batch_size,
                                              boundary=config.data.boundary)
    share_DLR = usage / np.maximum(usage.sum(-1, keepdims=True), 1)
    pictures = []
    for layer in range(config.model.num_layers):
        name = f"usage_layer_{layer:02d}.png"
        plot_usage(os.path.join(out_dir, name), share_DLR[:, layer], names, layer)
        pictures.append(name)
    jac = jaccard_matrix(mass, keep - e.num_shared_experts)
    plot_jaccard(os.path.join(out_dir, "jaccard.png"), jac, names, keep)

    labels = domains_of(docs)
    token_NF, token_doc_N = token_features(model, docs, tokenizer, first_tokens=first_tokens)
    token_emb_NP, token_cluster_N, token_scores = _cluster_level(
        out_dir, "tokens", token_NF, token_doc_N, labels, names, clusters, pca_dims, seed)
    doc_tokens = doc_tokens or config.data.seq_len
    doc_MF, doc_M = document_features(model, docs, tokenizer, max_tokens=doc_tokens,
                                      batch_size=batch_size)
    doc_emb_MP, doc_cluster_M, doc_scores = _cluster_level(
        out_dir, "documents", doc_MF, doc_M, labels, names, doc_clusters or len(names),
        pca_dims, seed)

    summary = {
        "source": source, "documents": len(docs), "domains": names,
        "tokens_per_domain": tokens.tolist(), "keep": keep, "routed_experts": routed,
        "top_k": e.top_k, "usage_share_DLR": share_DLR.tolist(), "jaccard": jac.tolist(),
        "clusters": int(token_cluster_N.max() + 1), "cluster_tokens": int(len(token_cluster_N)),
        "first_tokens": first_tokens, "pca_dims": int(token_emb_NP.shape[1]),
        "cluster_sizes": np.bincount(token_cluster_N).tolist(), **token_scores,
        "doc_clusters": int(doc_cluster_M.max() + 1), "cluster_documents": int(len(doc_M)),
        "doc_tokens": doc_tokens, "doc_pca_dims": int(doc_emb_MP.shape[1]),
        "doc_cluster_sizes": np.bincount(doc_cluster_M).tolist(),
        **{f"doc_{k}": v for k, v in doc_scores.items()},
    }
    with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(_report(summary, pictures))
    return summary


# Per clustering level: scatter picture and per-point file in the output directory, and the
# scatter's marker size (documents are few).
LEVEL_FILES = {"tokens": ("clusters.png", "tokens.npz", 4),
               "documents": ("doc_clusters.png", "documents.npz", 20)}


def _cluster_level(out_dir, level, features_NF, owners_N, labels, names, k, pca_dims, seed):
    """Clusters one level's points (`cluster_points`) and writes its picture and per-point file
    (`LEVEL_FILES`); returns (embedding [N, P], cluster [N], scores)."""
    emb_NP, cluster_N, domain_N, scores = cluster_points(features_NF, owners_N, labels, names,
                                                          k, pca_dims=pca_dims, seed=seed)
    picture, points, marker_size = LEVEL_FILES[level]
    plot_clusters(os.path.join(out_dir, picture), emb_NP, domain_N, names, cluster_N, seed,
                  what=level, marker_size=marker_size)
    np.savez_compressed(os.path.join(out_dir, points), cluster=cluster_N, domain=domain_N,
                        document=owners_N, xy=emb_NP[:, :2])
    return emb_NP, cluster_N, scores


def _score_row(level: str, s: dict, prefix: str) -> str:
    """One report table row of a level's clustering scores (keys `prefix` + score name)."""
    return (f"| {level} | {s[prefix + 'purity']:.3f} | {s[prefix + 'nmi']:.3f} | "
            f"{s[prefix + 'purity_shuffled']:.3f} | {s[prefix + 'nmi_shuffled']:.3f} | "
            f"{s[prefix + 'majority_share']:.3f} |")


def _report(s: dict, pictures: list[str]) -> str:
    names = s["domains"]
    lines = ["# Expert analysis", "",
             f"Data: `{s['source']}`, {s['documents']} documents; routed experts per layer: "
             f"{s['routed_experts']}, top-k {s['top_k']}; inference routing (no pool).", "",
             "| domain | tokens |", "|---|---|"]
    lines += [f"| {n} | {int(t)} |" for n, t in zip(names, s["tokens_per_domain"])]
    lines += ["", "## Router clustering", "",
              "Router distributions of all layers concatenated, mean-centred, reduced by PCA, "
              "L2-normalised and clustered by spherical k-means, at two levels:", "",
              f"- tokens: {s['cluster_tokens']} tokens (the first {s['first_tokens']} of each "
              f"document), PCA to {s['pca_dims']} dimensions, k={s['clusters']};",
              f"- documents: {s['cluster_documents']} documents, each its tokens' mean "
              f"distribution (over its first {s['doc_tokens']} tokens), PCA to "
              f"{s['doc_pca_dims']} dimensions, k={s['doc_clusters']}.", "",
              "The token level asks whether single tokens are routed by topic; the document "
              "level asks whether a document's average routing identifies its topic, which it "
              "can even where single tokens are routed by surface form (a space, a digit, a "
              "bracket).", ""]
    rows = [_score_row(level, s, prefix) for level, prefix in
            (("tokens", ""), ("documents", "doc_")) if prefix + "purity" in s]
    if rows:
        lines += ["| level | purity | NMI | purity, shuffled clusters (chance) | "
                  "NMI, shuffled clusters | purity of one cluster |", "|---|---|---|---|---|---|",
                  *rows, "",
                  "The purity of one cluster is the largest domain's share. Topical routing "
                  "(EMO) gives high purity/NMI; routing by surface patterns (a standard MoE) "
                  "gives values near chance.", ""]
    else:
        lines += ["No domain labels (or a single domain): purity and NMI not computed.", ""]
    lines += ["![token clusters](clusters.png)", "",
              "![document clusters](doc_clusters.png)", "",
              "## Overlap of per-domain subsets", "",
              f"Jaccard overlap of the {s['keep']}-expert subsets each domain selects (one-pass "
              "router mass, routed experts, mean over layers).", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
              for a, row in zip(names, s["jaccard"])]
    lines += ["", "![Jaccard overlap](jaccard.png)", "",
              "## Expert usage by domain", "",
              "Share of each domain's top-k assignments per routed expert.", ""]
    lines += [f"![{p}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"
