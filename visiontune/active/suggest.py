"""``visiontune suggest``: which photos of an unlabeled pool to label next.

    visiontune suggest --ckpt_path runs/.../checkpoints/last.ckpt --data.unlabeled pool/ --n 20
    visiontune suggest --delta task.safetensors --config fit.yaml --data.unlabeled pool/ --output next/suggest.csv

Two lists, from one pass of the trained model over the pool (eval transform, at ``data.image_size``):

1. ``uncertain``: the ``n`` images the model is least sure of (``--score margin``: one minus the gap between the
   two largest class probabilities; ``entropy``; weighted by how typical the image is of the pool, ``--density``),
   spread over the feature space: k-center greedy on the backbone's pooled features among the ``candidates * n``
   most uncertain images, so no two are near-duplicates (:mod:`visiontune.active.uncertain`);
2. ``novel``: the images that look like no known class: novelty against the class prototypes (the mean normalised
   feature of each class's training images when ``data.train`` is given, else the classifier's rows), above
   Otsu's threshold of the pool's scores (``--novel_threshold`` overrides), clustered by k-means into candidate
   new classes (k by silhouette, ``--clusters`` overrides), a contact sheet (PNG grid) per cluster
   (:mod:`visiontune.active.novelty`, :mod:`visiontune.active.sheets`).

Writes ``--output`` (CSV: ``path,reason,score,cluster``; ``score``: the uncertainty, or the novelty; ``cluster``:
empty for uncertain rows) and ``<output stem>_cluster<k>.png`` beside it, atomically, and prints a summary. An
image can be on both lists (one row each). It reads the config ``visiontune fit --config`` takes (the ``data:``
section: ``unlabeled``, ``train``, ``image_size``, ``batch_size``); a bad option or path is one line, exit 2.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from ..errors import UserError
from .novelty import class_prototypes, cluster_novel, head_prototypes, novelty_scores, novelty_threshold
from .uncertain import SCORES, select_uncertain, uncertainty_scores

__all__ = ["SuggestError", "SuggestResult", "pool_outputs", "suggest", "suggest_main"]

FIELDS = ("path", "reason", "score", "cluster")
SHEET_MAX = 48  # thumbnails per contact sheet


class SuggestError(UserError, ValueError):
    """A bad ``suggest`` option or input path; the message names it."""


@dataclass(frozen=True)
class SuggestResult:
    """What :func:`suggest` found in the pool.

    Attributes:
        rows: the CSV rows (``path``, ``reason`` ``"uncertain"``/``"novel"``, ``score``, ``cluster``), uncertain
            rows first (in the order picked), then novel ones (by cluster, most novel first).
        uncertain: pool indices of the uncertain picks, in the order picked.
        novel: pool indices of the novel images; ``clusters[i]`` is the cluster of ``novel[i]``.
        clusters: cluster id per novel image (``0..num_clusters-1``, largest cluster first).
        num_clusters: the number of clusters.
        uncertainty: ``(N,)`` uncertainty of every pool image.
        novelty: ``(N,)`` novelty of every pool image.
        threshold: the novelty threshold used.
        prototypes_from: ``"train"`` (class means of the training images) or ``"head"`` (classifier rows).
        paths: the pool's paths (or ids), in pool order.
        csv: the CSV written (``None`` without ``output``).
        sheets: the contact sheets written, one per cluster.
    """

    rows: list[dict[str, Any]]
    uncertain: list[int]
    novel: list[int]
    clusters: list[int]
    num_clusters: int
    uncertainty: np.ndarray
    novelty: np.ndarray
    threshold: float
    prototypes_from: str
    paths: list[str]
    csv: Optional[Path] = None
    sheets: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal: what was picked, the clusters, the files written."""
        lines = [f"suggest: {len(self.paths)} pool images; {len(self.uncertain)} uncertain picked "
                 f"(score {self.uncertainty[self.uncertain].min():.3f}-{self.uncertainty[self.uncertain].max():.3f})"
                 if self.uncertain else f"suggest: {len(self.paths)} pool images; no uncertain pick"]
        lines.append(f"novel: {len(self.novel)} images above novelty {self.threshold:.3f} (prototypes from "
                     f"{self.prototypes_from}) in {self.num_clusters} cluster(s)"
                     + (": sizes " + ", ".join(str(self.clusters.count(k)) for k in range(self.num_clusters))
                        if self.num_clusters else ""))
        if self.csv is not None:
            lines.append(f"wrote {self.csv}" + (f" and {len(self.sheets)} contact sheet(s): {self.sheets[0].name}"
                                                + (" ..." if len(self.sheets) > 1 else "") if self.sheets else ""))
        return "\n".join(lines)


@torch.no_grad()
def pool_outputs(net: torch.nn.Module, dataset: Any, *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features and logits of every image of ``dataset`` (eval mode), from one backbone pass
    (:func:`visiontune.training.cache.extract_features`), then the head twice (``pre_logits`` and logits).

    Returns:
        ``(features (N, D), logits (N, C))`` on the CPU.

    Example:
        >>> feats, logits = pool_outputs(model.evaluated_net(), pool_dataset)  # doctest: +SKIP
    """
    from ..training.cache import extract_features

    maps, _, pooled = extract_features(net, dataset, batch_size=batch_size)
    if pooled:
        maps = maps[:, :, None, None]
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    feats, logits = [], []
    try:
        for i in range(0, len(maps), batch_size):
            chunk = maps[i: i + batch_size].to(device)
            feats.append(net.forward_head(chunk, pre_logits=True).flatten(1).float().cpu())
            logits.append(net.forward_head(chunk).float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def _load_model(model: Any):
    """A TransferClassifier, from itself, a checkpoint (``.ckpt``) or a task delta (``.safetensors``)."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    path = Path(model)
    if not path.is_file():
        raise SuggestError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from ..delta.build import build_from_delta

        return build_from_delta(path)
    from ..training.module import TransferClassifier

    return TransferClassifier.load(str(path))


def _dataset(source: Any, role: str, model: Any, image_size: Optional[int], labeled: bool):
    """The ``role`` images under the model's eval transform; labels re-indexed onto the model's classes."""
    from ..data.dataset import ImageDataset
    from ..data.sources import DataError, align_classes, read_source
    from ..data.transforms import eval_transform

    try:
        samples = read_source(source, labeled=labeled)
        if labeled:
            samples = align_classes(samples, list(model.class_names), role)
    except DataError as err:
        raise SuggestError(f"--data.{role}: " + "; ".join(err.problems)) from None
    if len(samples) == 0:
        raise SuggestError(f"--data.{role}: {source!r} holds no images")
    cfg = model.data_config
    size = image_size or int(cfg["input_size"][-1])
    transform = eval_transform(size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bilinear"))
    return ImageDataset(samples, transform)


def _prototypes(model: Any, net: torch.nn.Module, train: Any, image_size: Optional[int],
                batch_size: int) -> tuple[torch.Tensor, str]:
    """The known classes' prototypes: class means of the training images, else the classifier's rows."""
    if train is None:
        return head_prototypes(net), "head"
    labeled = _dataset(train, "train", model, image_size, True)
    feats, _ = pool_outputs(net, labeled, batch_size=batch_size)
    return class_prototypes(feats, torch.as_tensor(labeled.samples.labels), len(model.class_names)), "train"


def _check_options(n: int, score: str, clusters: Optional[int], candidates: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise SuggestError(f"--n must be a positive integer (the images to suggest), got {n!r}")
    if score not in SCORES:
        raise SuggestError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if clusters is not None and (not isinstance(clusters, int) or clusters < 1):
        raise SuggestError(f"--clusters must be a positive integer, got {clusters!r}")
    if not isinstance(candidates, int) or candidates < 1:
        raise SuggestError(f"--candidates must be an integer >= 1, got {candidates!r}")


def suggest(
    model: Any,
    unlabeled: Any,
    n: int = 20,
    *,
    train: Any = None,
    score: Literal["margin", "entropy"] = "margin",
    clusters: Optional[int] = None,
    output: Union[str, os.PathLike, None] = None,
    image_size: Optional[int] = None,
    batch_size: int = 64,
    candidates: int = 4,
    density: bool = True,
    novel_threshold: Optional[float] = None,
) -> SuggestResult:
    """Rank an unlabeled pool for labelling: ``n`` uncertain, diverse images, and the novel ones in clusters.

    Args:
        model: a :class:`~visiontune.TransferClassifier`, or the path of a checkpoint (``.ckpt``) or a task delta
            (``.safetensors``).
        unlabeled: the pool (folder, CSV, built-in name, ``(images, labels)`` arrays).
        n: how many uncertain images to suggest.
        train: the model's labeled training images (same sources): prototypes are their class means; ``None``:
            the classifier's rows.
        score: ``"margin"`` or ``"entropy"`` (:func:`~visiontune.active.uncertain.uncertainty_scores`).
        clusters: the number of novel clusters; ``None``: chosen by silhouette.
        output: the CSV to write (contact sheets ``<stem>_cluster<k>.png`` beside it); ``None``: write nothing.
        image_size: the input side (use the training one); ``None``: the backbone's default.
        batch_size: inference batch size.
        candidates: k-center greedy runs among the ``candidates * n`` most uncertain images.
        density: rank the candidates by uncertainty x typicality (:func:`~visiontune.active.uncertain.density_scores`)
            instead of uncertainty alone.
        novel_threshold: novelty above which an image is novel; ``None``: Otsu's threshold of the pool's scores.

    Returns:
        a :class:`SuggestResult`.

    Example:
        >>> import visiontune as vt
        >>> r = vt.suggest("runs/x/checkpoints/last.ckpt", "pool/", n=20, train="photos/",
        ...                image_size=96, output="suggest.csv")  # doctest: +SKIP
        >>> print(r.summary())  # doctest: +SKIP
    """
    _check_options(n, score, clusters, candidates)
    net_model = _load_model(model)
    pool = _dataset(unlabeled, "unlabeled", net_model, image_size, False)
    net = net_model.evaluated_net()
    feats, logits = pool_outputs(net, pool, batch_size=batch_size)
    uncertainty = uncertainty_scores(logits, score)
    protos, source = _prototypes(net_model, net, train, image_size, batch_size)
    if protos.shape[1] != feats.shape[1]:
        raise SuggestError("the classifier's rows do not live in the pooled features (a head with hidden "
                           "layers): give the training images (data.train) for the class prototypes")
    novelty = novelty_scores(feats, protos)
    threshold = float(novel_threshold) if novel_threshold is not None else novelty_threshold(novelty)
    novel = torch.nonzero(novelty > threshold).flatten()
    novel = novel[torch.argsort(novelty[novel], descending=True, stable=True)]
    cluster_ids, k = cluster_novel(feats[novel], clusters)
    picks = select_uncertain(uncertainty, feats, n, candidates=candidates, density=density)
    paths = [pool.samples.describe(i) for i in range(len(pool))]
    novel_list = novel.tolist()
    order = sorted(range(len(novel_list)), key=lambda j: (int(cluster_ids[j]), j))  # by cluster, most novel first
    rows = [{"path": paths[i], "reason": "uncertain", "score": round(float(uncertainty[i]), 6), "cluster": ""}
            for i in picks]
    rows += [{"path": paths[novel_list[j]], "reason": "novel", "score": round(float(novelty[novel_list[j]]), 6),
              "cluster": int(cluster_ids[j])} for j in order]
    result = SuggestResult(
        rows=rows, uncertain=picks, novel=[novel_list[j] for j in order],
        clusters=[int(cluster_ids[j]) for j in order], num_clusters=k, uncertainty=uncertainty.numpy(),
        novelty=novelty.numpy(), threshold=threshold, prototypes_from=source, paths=paths,
    )
    if output is None:
        return result
    csv_path, sheets = _write(result, pool, Path(output))
    return SuggestResult(**{**result.__dict__, "csv": csv_path, "sheets": sheets})


def _write(result: SuggestResult, pool: Any, output: Path) -> tuple[Path, list[Path]]:
    """The CSV and one contact sheet per cluster, each written atomically."""
    from ..io import atomic_write
    from .sheets import save_contact_sheet

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    sheets = []
    for k in range(result.num_clusters):
        members = [i for i, c in zip(result.novel, result.clusters) if c == k]
        images = [pool.load(i) for i in members[:SHEET_MAX]]
        title = f"cluster {k}: {len(members)} image(s)" + (f", first {SHEET_MAX}" if len(members) > SHEET_MAX else "")
        sheets.append(save_contact_sheet(images, output.with_name(f"{output.stem}_cluster{k}.png"), title=title))
    return atomic_write(output, buf.getvalue()), sheets


def _own_options(parser: Any) -> None:
    """suggest's options, next to fit's (the pool is ``--data.unlabeled``, prototypes' images ``--data.train``)."""
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="the trained model's checkpoint")
    parser.add_argument("--n", type=int, default=20, help="uncertain images to suggest")
    parser.add_argument("--score", type=str, default="margin", help="uncertainty: margin | entropy")
    parser.add_argument("--clusters", type=Optional[int], default=None,
                        help="novel clusters (default: chosen by silhouette)")
    parser.add_argument("--candidates", type=int, default=4,
                        help="k-center greedy among the candidates * n most uncertain images")
    parser.add_argument("--density", type=bool, default=True,
                        help="rank candidates by uncertainty x typicality (false: uncertainty alone)")
    parser.add_argument("--novel_threshold", type=Optional[float], default=None,
                        help="novelty above which an image is novel (default: Otsu's threshold of the pool)")
    parser.add_argument("--output", type=str, default="suggest.csv", help="the CSV (contact sheets beside it)")


def suggest_main(argv: Sequence[str]) -> int:
    """``visiontune suggest`` (see the module docs); exit 0, or 2 for bad options and paths."""
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune suggest", argv, _own_options, description=__doc__.split("\n\n")[0])
    cfg = cli.config
    ckpt, delta = cfg.ckpt_path, cfg.get("delta")
    if not ckpt and not delta:
        raise SuggestError("give the model: --ckpt_path CKPT or --delta DELTA.safetensors")
    if ckpt and delta:
        raise SuggestError("--ckpt_path and --delta exclude each other: give one model")
    model_path = ckpt or delta
    if not Path(model_path).is_file():
        raise SuggestError(f"--{'ckpt_path' if ckpt else 'delta'}: {model_path!r} does not exist")
    data = cfg.data
    if data.unlabeled is None:
        raise SuggestError("give the pool to rank: --data.unlabeled FOLDER (or data.unlabeled in --config)")
    if isinstance(data.unlabeled, str) and data.unlabeled == "rest":
        raise SuggestError("--data.unlabeled: suggest needs a folder or a CSV of the pool, not 'rest'")
    if isinstance(data.unlabeled, str) and not Path(data.unlabeled).expanduser().exists():
        raise SuggestError(f"--data.unlabeled: {data.unlabeled!r} does not exist")
    _check_options(cfg.n, cfg.score, cfg.clusters, cfg.candidates)
    result = suggest(model_path, data.unlabeled, cfg.n, train=data.train, score=cfg.score, clusters=cfg.clusters,
                     output=cfg.output, image_size=data.image_size, batch_size=data.batch_size,
                     candidates=cfg.candidates, density=cfg.density, novel_threshold=cfg.novel_threshold)
    print(result.summary(), file=sys.stdout)
    return 0
