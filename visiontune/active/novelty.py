"""Images that look like no known class: a novelty score against class prototypes, then clusters of the novel
images as candidate new classes.

Novelty of an image: ``1 - max_k cos(f, p_k)``, its feature ``f`` against the prototypes ``p_k`` of the known
classes (optionally both relative to a centre ``c``; measured on the photos with 5 labels per known class, 20
seeds: AUROC 0.758 uncentred, 0.753 centred on the training mean, so :func:`~.suggest.suggest` does not centre).
Prototypes are :func:`class_prototypes` (the mean normalised
feature of each class's training images) or :func:`head_prototypes` (the rows of the classifier, when no
training images are given). Images above :func:`novelty_threshold` (Otsu's split of the pool's scores, unless
given) are clustered by :func:`cluster_novel` (k-means; k by silhouette).

Example:
    >>> import torch
    >>> protos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> novelty_scores(torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 1.0]]), protos).tolist()[1]
    1.0
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["class_prototypes", "cluster_novel", "head_prototypes", "novelty_scores", "novelty_threshold"]


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int,
                     center: Optional[Tensor] = None) -> Tensor:
    """The mean L2-normalised feature of each class (renormalised); a class without images gets a NaN row
    (ignored by :func:`novelty_scores`).

    Args:
        features: ``(N, D)`` features of labeled images.
        labels: ``(N,)`` their class indices in ``[0, num_classes)``.
        num_classes: number of classes (rows).
        center: subtracted from the features first (e.g. their mean); ``None``: none.

    Example:
        >>> import torch
        >>> class_prototypes(torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]]), torch.tensor([0, 1, 1]), 3)
        tensor([[1., 0.],
                [0., 1.],
                [nan, nan]])
    """
    x = features.float() if center is None else features.float() - center
    x = F.normalize(x, dim=1)
    labels = torch.as_tensor(labels).long()
    rows = []
    for k in range(num_classes):
        members = x[labels == k]
        rows.append(F.normalize(members.mean(0), dim=0) if len(members) else torch.full((x.shape[1],), float("nan")))
    return torch.stack(rows)


def head_prototypes(net: nn.Module) -> Tensor:
    """The classifier's rows (one per class), flattened: the prototypes when no training images are given.

    Example:
        >>> import timm
        >>> head_prototypes(timm.create_model("resnet18", num_classes=3)).shape
        torch.Size([3, 512])
    """
    from ..models.heads import find_head

    layers = find_head(net).output_layers
    if not layers:
        raise ValueError(f"{type(net).__name__} has no classifier rows")
    weight = layers[0].weight.detach().float()
    return weight.reshape(weight.shape[0], -1).cpu()


@torch.no_grad()
def novelty_scores(features: Tensor, prototypes: Tensor, center: Optional[Tensor] = None) -> Tensor:
    """``1 - max_k cos(f - center, p_k - center)`` per image (in ``[0, 2]``; higher = less like any known class).

    Args:
        features: ``(N, D)`` pool features.
        prototypes: ``(K, D)`` one row per known class (NaN rows are skipped), e.g. :func:`class_prototypes`
            (already relative to ``center``: pass the same ``center`` for the features only) or
            :func:`head_prototypes`.
        center: subtracted from the features; ``None``: none.

    Example:
        >>> import torch
        >>> novelty_scores(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])).tolist()
        [1.0]
    """
    if prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"prototypes have {prototypes.shape[1]} dimensions, the features {features.shape[1]}")
    protos = prototypes.float()[~torch.isnan(prototypes.float()).any(1)]
    x = features.float() if center is None else features.float() - center
    sims = F.normalize(x, dim=1) @ F.normalize(protos, dim=1).T
    return 1.0 - sims.max(1).values


def novelty_threshold(scores: Tensor | np.ndarray) -> float:
    """Otsu's threshold of the scores: the cut between two groups (below / above) that maximises their
    between-group variance, placed halfway between the two groups' nearest scores (the scores of known-class
    images and of novel ones form two modes when both are present).

    Example:
        >>> novelty_threshold([0.1, 0.12, 0.11, 0.6, 0.62])
        0.36
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size < 2 or s[-1] == s[0]:
        return float(s[-1]) if s.size else 0.0
    n = np.arange(1, s.size, dtype=np.float64)  # size of the lower group, cutting after each position
    low = np.cumsum(s)[:-1]
    mean_low, mean_high = low / n, (s.sum() - low) / (s.size - n)
    between = n * (s.size - n) * (mean_low - mean_high) ** 2
    between[s[1:] == s[:-1]] = -1  # a cut must separate different values
    i = int(np.argmax(between))
    return float(round((s[i] + s[i + 1]) / 2, 12))


def cluster_novel(features: Tensor, clusters: Optional[int] = None, *, max_clusters: int = 8,
                  seed: int = 0) -> tuple[np.ndarray, int]:
    """k-means (scikit-learn, 10 starts) on the L2-normalised features of the novel images.

    The number of clusters: ``clusters`` when given, else the k in ``2..min(max_clusters, M // 2)`` with the
    largest silhouette score; fewer than 4 images are one cluster.

    Args:
        features: ``(M, D)`` features of the novel images (centred like the novelty scores).
        clusters: the number of clusters (``--clusters``), or ``None`` to choose it.
        max_clusters: the largest k tried.
        seed: k-means' random state.

    Returns:
        ``(labels (M,) int, k)``: cluster ids ``0..k-1``, numbered by cluster size, largest first.

    Example:
        >>> import torch
        >>> pts = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.05, 1.0]])
        >>> cluster_novel(pts)
        (array([1, 1, 0, 0, 0]), 2)
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = F.normalize(features.float(), dim=1).numpy().astype(np.float64)
    m = len(x)
    if m == 0:
        return np.zeros(0, dtype=np.int64), 0
    if clusters is None:
        ks = list(range(2, min(max_clusters, m // 2) + 1))  # at least two images per cluster on average
        best, k = -2.0, 1
        for kk in ks:
            labels = KMeans(kk, n_init=10, random_state=seed).fit_predict(x)
            if len(set(labels)) < 2:
                continue
            score = silhouette_score(x, labels)
            if score > best + 1e-9:
                best, k = score, kk
    else:
        k = max(1, min(int(clusters), m))
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(x) if k > 1 else np.zeros(m, dtype=np.int64)
    sizes = np.bincount(labels, minlength=k)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return rank[labels].astype(np.int64), k
