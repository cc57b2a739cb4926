"""Labelling a user's unlabeled photos once, before training, when classes are added.

A model fine-tuned on the old classes is a poor judge of new ones: its features specialise on what it
was trained to tell apart. Measured on real photos (8 old + 4 new classes, 5 labels each, 96 px,
EfficientNet-Lite0): nearest-prototype accuracy among the 4 new classes is 0.52-0.55 in the fine-tuned
model's features and 0.68-0.73 in the pretrained (ImageNet) features of the same backbone; refined over
the unlabeled pool (k-means started at the support prototypes), 0.61 vs 0.75. The grown, calibrated
head tells *whether* an image is new well (mean new-class probability 0.47 on new-class pool images,
0.04 on old ones); the pretrained features tell *which* new class.

:func:`label_new_in_pool` (``class_expansion.label_pool: new``) combines the two: pool images whose
new-class probability under the grown head is ``>= new_mass`` get the new class of their nearest refined prototype in the prior feature space
(measured: 52 images labelled, 48 truly new, 79 % of them with the right class). The class-expansion
objective uses these labels as certain pseudo-labels (and replays them as labeled examples), next to
the old model's confident old-class labels. :func:`label_whole_pool` (``label_pool: all``) labels every
pool image instead, old or new.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    >>> feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    >>> label_new_in_pool(probs, 1, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1]), feats).tolist()
    [-1, 1, 2]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["label_new_in_pool", "label_whole_pool", "pooled_features"]


@torch.no_grad()
def pooled_features(net: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Pre-logit features of ``images`` (eval mode, no graph; the net's mode is restored)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        out = [net.forward_head(net.forward_features(images[i: i + batch_size].to(device)), pre_logits=True)
               for i in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out).flatten(1).float().cpu()


@torch.no_grad()
def label_new_in_pool(probs: Tensor, num_old: int, support_features: Tensor, support_labels: Tensor,
                      pool_features: Tensor, *, new_mass: float = 0.5, iters: int = 10) -> Tensor:
    """New-class labels for the pool images that look new; ``-1`` for the others.

    Args:
        probs: ``(M, num_old + num_new)`` class probabilities of the pool under the grown head.
        num_old: number of old classes (new classes follow them).
        support_features: ``(N, D)`` prior-space features of the labeled new-class images.
        support_labels: ``(N,)`` their indices into the new classes, ``[0, num_new)``.
        pool_features: ``(M, D)`` prior-space features of the pool, in the order of ``probs``.
        new_mass: an image is new when its summed new-class probability is ``>= new_mass``.
        iters: k-means refinement steps (prototypes: the normalised mean of the support and of the pool
            images assigned to the class, in features centred on the pool mean).

    Returns:
        ``(M,)`` long: full-list class index (``num_old + j``) or ``-1``.
    """
    num_new = probs.shape[1] - num_old
    labels = torch.full((len(probs),), -1, dtype=torch.long)
    looks_new = probs[:, num_old:].sum(1) >= new_mass
    if num_new <= 0 or not bool(looks_new.any()):
        return labels
    mu = pool_features.mean(0)
    support = F.normalize(support_features.float() - mu, dim=1)
    pool = F.normalize(pool_features[looks_new].float() - mu, dim=1)
    y = torch.as_tensor(support_labels).long()

    def prototypes(assigned: Tensor | None) -> Tensor:
        rows = []
        for j in range(num_new):
            members = support[y == j] if assigned is None else torch.cat([support[y == j], pool[assigned == j]])
            rows.append(members.mean(0))
        return F.normalize(torch.stack(rows), dim=1)

    protos = prototypes(None)
    for _ in range(iters):
        assigned = (pool @ protos.T).argmax(1)
        protos = prototypes(assigned)
    labels[looks_new] = (pool @ protos.T).argmax(1) + num_old
    return labels


@torch.no_grad()
def label_whole_pool(old_probs: Tensor, support_features: Tensor, support_labels: Tensor, pool_features: Tensor,
                     *, temperature: float = 0.05, old_weight: float = 2.0, new_weight: float = 1.0,
                     anchor_threshold: float = 0.8, iters: int = 20) -> Tensor:
    """A class (old or new) for every pool image: soft k-means in the prior features, steered by the old model.

    One prototype per class in the prior (pretrained) features, centred on the pool mean and normalised:
    an old class starts from the pool images the frozen old model gives it with ``max p >=
    anchor_threshold``, a new class from its labeled images. Each step assigns the pool softly,
    ``softmax(cos(x, prototype) / temperature + old_weight * log p_old(class | x))`` (the old model's term
    only on the old classes: it says *which* old class, the prior features say *whether* old or new),
    and moves every prototype to the weighted mean of its pool images plus its labeled ones. A new image
    the old model is ``anchor_threshold`` sure of seeds that old class's prototype: a whole new class the
    old model confidently mistakes for one old class pulls that prototype over (the grown head's
    calibration and FixMatch's anchoring share the threshold).

    The old model's confidence also weighs against *new*: the new classes get ``new_weight * log(1 - max
    p_old)``, so an image the old model is sure of needs clearer feature evidence to be called new.

    Measured (``benchmarks/new_classes.py`` splits, 96 px, EfficientNet-Lite0, in features): on real photos
    (8 old + 4 new classes, 5 labels each, 220 pool images of which ~106 new; seeds 0-2) 0.79 of the pool
    labelled right (old-class images 0.94, new-class 0.63), where :func:`label_new_in_pool` labels about 52
    images; on clip art (``art4apps``, 7 + 3 classes; seeds 0, 2), where the pretrained features separate the
    classes poorly, 0.53-0.58, and a quarter of the old-class images are called new. ``new_weight`` 0 / 0.5 /
    1 / 2 on photos seed 0: 0.79 / 0.81 / 0.82 / 0.78.

    Args:
        old_probs: ``(M, num_old)`` class probabilities of the pool under the frozen old model.
        support_features: ``(N, D)`` prior-space features of the labeled new-class images.
        support_labels: ``(N,)`` their indices into the new classes, ``[0, num_new)``.
        pool_features: ``(M, D)`` prior-space features of the pool, in the order of ``old_probs``.
        temperature: softness of the assignment to prototypes (cosine / temperature).
        old_weight: weight of the old model's log-probabilities.
        anchor_threshold: old model's confidence for a pool image to seed its old class's prototype.
        iters: assignment / update steps.

    Returns:
        ``(M,)`` long: class index into ``old + new``.

    Example:
        >>> old = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
        >>> feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        >>> label_whole_pool(old, torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0]), feats).tolist()
        [0, 1, 2]
    """
    num_old = old_probs.shape[1]
    y = torch.as_tensor(support_labels).long()
    num_new = int(y.max()) + 1 if len(y) else 0
    mu = pool_features.float().mean(0)
    pool = F.normalize(pool_features.float() - mu, dim=1)
    support = F.normalize(support_features.float() - mu, dim=1)
    log_old = torch.zeros(len(pool), num_old + num_new)
    log_old[:, :num_old] = old_weight * old_probs.float().clamp_min(1e-9).log()
    conf, cls = old_probs.float().max(1)
    log_old[:, num_old:] = new_weight * (1 - conf).clamp_min(1e-3).log()[:, None]
    seed = torch.zeros(len(pool), num_old + num_new)
    keep = conf >= anchor_threshold
    seed[keep.nonzero().flatten(), cls[keep]] = 1.0
    onehot = torch.zeros(len(y), num_old + num_new)
    onehot[torch.arange(len(y)), num_old + y] = 1.0
    labeled = onehot.T @ support

    def prototypes(weights: Tensor) -> Tensor:
        return F.normalize(weights.T @ pool + labeled, dim=1)

    protos = prototypes(seed)
    for _ in range(iters):
        protos = prototypes((pool @ protos.T / temperature + log_old).softmax(1))
    return (pool @ protos.T / temperature + log_old).argmax(1)
