"""The case table of the generality test: timm families × every strategy (one definition).

Shared by ``tests/test_any_backbone.py`` (one test per cell) and ``benchmarks/backbone_table.py`` (the
Markdown table). Each :class:`Case` is one timm family as one tiny, random-init model: a timm model name,
``timm.create_model`` arguments that shrink it (they travel as ``backbone_args``), and the input size.

:func:`run_cell` runs one (family, strategy) cell through the public API only (``import visiontune as vt``):

1. ``vt.apply_strategy`` on a copy of the family's cached base (``vt.create_backbone``, seeded);
2. two AdamW steps (``vt.param_groups``, the strategy's ``default_lr``) on a random batch of 2: the frozen
   parameters (and, for ``sparse``, the entries outside the masks) stay bit-identical, the head moves, and
   something beyond the head moves (gradient-driven) unless the strategy is ``linear``;
3. ``vt.save_delta`` → ``vt.build_from_delta`` on a fresh base built the same way (same seed, same
   ``backbone_args``): the rebuilt TransferClassifier gives the same logits in eval mode (atol 1e-5);
4. ``lora`` (and ``dora``, ``ssf``): ``vt.merge``, ``vt.unmerge`` and ``vt.merge_and_unload`` give the same
   logits; ``qlora``: ``vt.merge_and_unload`` (its own dequantised weights) within 1e-4 relative.

A strategy that does not fit a model must refuse with a ``vt.StrategyError`` naming the strategy and the
model (:class:`Refused`); anything else that goes wrong is a broken cell (the exception propagates).

``Case.refuses``: the strategies that refuse on the family (an expected outcome). ``Case.broken``: the
cells known broken, strategy -> cause; the test marks them ``xfail(strict=True)``, so a fix shows up as a
failure to remove the entry. Causes are grouped by the ``CAUSE_*`` constants.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import visiontune as vt

SEED = 0
NUM_CLASSES = 3
CLASSES = ["a", "b", "c"]
BATCH = 2
ATOL_ROUND_TRIP = 1e-5
ATOL_MERGE = 1e-5
RTOL_QLORA_MERGE = 1e-4

#: Options per strategy: small, and non-trivial where it matters (gaussian LoRA init: the merged delta is
#: non-zero from the start; deep prompts: every block gets its own). A strategy registered later runs with
#: its defaults.
OPTIONS: dict[str, dict[str, Any]] = {
    "full": {}, "linear": {}, "last_k": {"k": 1}, "bitfit": {}, "norm": {},
    "lora": {"rank": 2, "init": "gaussian"},
    "qlora": {"rank": 2, "init": "gaussian", "bits": 4},
    "dora": {"rank": 2, "init": "gaussian"},
    "adapter": {}, "vpt": {"length": 2, "deep": True}, "sparse": {"fraction": 0.05}, "ssf": {},
}
#: How each strategy that merges is merged: ``"merge"`` = ``vt.merge`` (then ``vt.unmerge``) and
#: ``vt.merge_and_unload``, exact up to float rounding; ``"unload"`` = only ``vt.merge_and_unload`` (qlora:
#: the dequantised weights), within ``RTOL_QLORA_MERGE`` relative.
MERGE: dict[str, str] = {"lora": "merge", "dora": "merge", "ssf": "merge", "qlora": "unload"}


def strategies() -> list[str]:
    """Every registered strategy (the table's columns)."""
    return vt.available_strategies()


def options(strategy: str) -> dict[str, Any]:
    return dict(OPTIONS.get(strategy, {}))


# ------------------------------------------------------------------------------------------ causes
# Each broken cell names one of these: what breaks, and where (the first failure of the cell). None is known
# today (issue #15 fixed the last 13 causes); a new one goes here, e.g.
# CAUSE_X = "what breaks (the first failure of the cell): file.py:function"
# and the family gets broken=_each(LORA_FAMILY, CAUSE_X) or broken=_all(CAUSE_X, but=("vpt",)).

LORA_FAMILY = ("lora", "qlora", "dora")


def _all(cause: str, *, but: tuple[str, ...] = ()) -> dict[str, str]:
    """Every registered strategy except ``but`` -> ``cause``."""
    return {s: cause for s in strategies() if s not in but}


def _each(names: tuple[str, ...], cause: str) -> dict[str, str]:
    """``names`` (those registered) -> ``cause``."""
    return dict.fromkeys((s for s in names if s in strategies()), cause)


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    """One timm family as one tiny random-init model."""

    family: str
    model: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    size: int = 32
    nightly: bool = False
    refuses: frozenset[str] = frozenset()
    broken: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.family


def _r(*names: str) -> frozenset[str]:
    return frozenset(names)


CNN = _r("vpt")  # VPT needs a ViT-style token sequence: every CNN refuses it (a StrategyError naming both)

CASES: list[Case] = [
    # ---- CNNs
    Case("resnet", "resnet10t", {"channels": (16, 32, 64, 128), "stem_width": 8}, refuses=CNN),
    Case("resnet-bottleneck", "resnet26", {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 16},
         refuses=CNN),
    Case("convnext", "convnext_atto", {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}, refuses=CNN),
    Case("efficientnet", "test_efficientnet", {}, refuses=CNN),
    Case("efficientnet-lite", "tf_efficientnet_lite0", {}, refuses=CNN),
    Case("mobilenetv3", "mobilenetv3_small_050", {}, refuses=CNN),
    Case("mobilenetv4", "mobilenetv4_conv_small_035", {}, refuses=CNN),
    Case("regnet", "regnetx_002", {}, refuses=CNN),
    Case("densenet", "densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1)}, refuses=CNN),
    Case("ghostnet", "ghostnet_050", {}, refuses=CNN),
    Case("rexnet", "rexnet_100", {"width_mult": 0.5}, refuses=CNN),
    Case("dla", "dla34", {"levels": [1, 1, 1, 1, 1, 1], "channels": [8, 8, 16, 16, 32, 64]}, refuses=CNN),
    Case("nfnet", "test_nfnet", {}, refuses=CNN),
    Case("byobnet", "test_byobnet", {}, refuses=CNN),
    Case("lcnet", "lcnet_050", {}, refuses=CNN),
    Case("vovnet", "ese_vovnet19b_slim_dw", {}, refuses=CNN),
    Case("starnet", "starnet_s050", {}, refuses=CNN),
    Case("repvit", "repvit_m0_9", {"depth": (1, 1, 1, 1), "embed_dim": (16, 32, 64, 128)}, refuses=CNN),
    Case("fastvit", "fastvit_t8", {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)}, refuses=CNN),
    Case("mobilevit", "mobilevit_xxs", {}, size=64, refuses=CNN),
    Case("edgenext", "edgenext_xx_small", {"depths": (1, 1, 1, 1)}, refuses=CNN),
    Case("mambaout", "test_mambaout", {}, refuses=CNN),
    # ---- ViT-style transformers
    Case("vit", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    Case("deit-distilled", "deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    Case("eva02", "eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, size=28),
    Case("beit", "beit_base_patch16_224",
         {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}),
    Case("cait", "cait_xxs24_224", {"img_size": 32, "patch_size": 8, "depth": 2, "depth_token_only": 1}),
    Case("xcit", "xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}, refuses=_r("vpt")),
    Case("convit", "convit_tiny", {"img_size": 32, "patch_size": 8, "depth": 2, "local_up_to_layer": 1},
         refuses=_r("vpt")),
    Case("pit-distilled", "pit_ti_distilled_224", {"img_size": 32, "depth": [1, 1, 1], "base_dims": [16, 16, 16]},
         refuses=_r("vpt")),
    # ---- hierarchical transformers, hybrids, MLPs
    Case("swin", "swin_tiny_patch4_window7_224",
         {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)},
         refuses=_r("vpt")),
    Case("pvt_v2", "pvt_v2_b0", {"depths": (1, 1, 1, 1)}, refuses=_r("vpt")),
    Case("coat", "coat_lite_tiny", {"img_size": 32, "serial_depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 64]},
         refuses=_r("vpt")),
    Case("levit", "levit_128s", {"img_size": 32}, refuses=_r("vpt")),
    Case("hiera", "hiera_tiny_224", {"img_size": 64, "embed_dim": 16, "stages": (1, 1, 1, 1)}, size=64,
         refuses=_r("vpt")),
    Case("davit", "davit_tiny", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), "num_heads": (1, 1, 2, 2)},
         refuses=_r("vpt")),
    Case("efficientformerv2", "efficientformerv2_s0",
         {"img_size": 64, "depths": (1, 1, 2, 2), "embed_dims": (16, 32, 64, 128)}, size=64, refuses=_r("vpt")),
    Case("maxvit", "test_maxvit", {"img_size": 64}, size=64, refuses=_r("vpt")),
    Case("coatnet", "test_coatnet", {"img_size": 64}, size=64, refuses=_r("vpt")),
    Case("tiny_vit", "tiny_vit_5m_224",
         {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 64), "num_heads": (1, 1, 2, 2)}, size=64,
         refuses=_r("vpt")),
    Case("mixer", "mixer_s16_224", {"img_size": 32, "mlp_ratio": (0.5, 0.25)}, refuses=_r("vpt")),
    # ---- nightly (VISIONTUNE_NIGHTLY=1): bigger models, families timm gives no shrinking arguments for
    Case("inception_v3", "inception_v3", {}, size=75, nightly=True, refuses=CNN),
    Case("nfnet-resnet", "nf_resnet26", {}, nightly=True, refuses=CNN),
    Case("vit-relpos", "test_vit_relpos", {"img_size": 32}, nightly=True, refuses=_r("vpt")),
    Case("resmlp", "resmlp_12_224", {"img_size": 32}, nightly=True, refuses=_r("vpt")),
    Case("gmlp", "gmlp_ti16_224", {"img_size": 32}, nightly=True, refuses=_r("vpt")),
    Case("poolformer", "poolformer_s12", {}, nightly=True, refuses=CNN),
    Case("caformer", "caformer_s18", {}, nightly=True, refuses=_r("vpt")),
    Case("twins", "twins_svt_small", {"img_size": 32, "depths": (1, 1, 1, 1)}, nightly=True, refuses=_r("vpt")),
    Case("efficientvit-mit", "efficientvit_b0", {}, nightly=True, refuses=CNN),
    Case("efficientvit-msra", "efficientvit_m0", {"img_size": 64}, size=64, nightly=True, refuses=_r("vpt")),
    Case("hgnetv2", "hgnetv2_b0", {}, nightly=True, refuses=CNN),
    Case("mobileone", "mobileone_s0", {}, nightly=True, refuses=CNN),
    Case("repvgg", "repvgg_a0", {}, nightly=True, refuses=CNN),
    Case("fasternet", "fasternet_t0", {}, nightly=True, refuses=CNN),
    Case("shvit", "shvit_s1", {}, size=64, nightly=True, refuses=_r("vpt")),
    Case("swiftformer", "swiftformer_xs", {}, nightly=True, refuses=_r("vpt")),
    Case("inception_next", "inception_next_atto", {"depths": (1, 1, 1, 1)}, nightly=True, refuses=CNN),
    Case("sequencer", "sequencer2d_s", {"img_size": 32, "layers": [1, 1, 1, 1]}, nightly=True, refuses=_r("vpt")),
    Case("visformer", "visformer_tiny", {"img_size": 32}, nightly=True, refuses=_r("vpt")),
    Case("mixnet", "mixnet_s", {}, nightly=True, refuses=CNN),
    Case("res2net", "res2net50_14w_8s", {"layers": (1, 1, 1, 1)}, nightly=True, refuses=CNN),
    Case("resnest", "resnest14d", {}, nightly=True, refuses=CNN),
    Case("dpn", "dpn48b", {}, nightly=True, refuses=CNN),
    Case("gcvit", "gcvit_xxtiny", {"img_size": 64}, size=64, nightly=True, refuses=_r("vpt")),
    Case("efficientnet-b0", "efficientnet_b0", {}, nightly=True, refuses=CNN),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate family ids"


# ------------------------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=None)
def _base(family: str) -> nn.Module:
    """The family's seeded random-init base, built as TransferClassifier builds it (cached: copy it)."""
    case = CASES_BY_ID[family]
    torch.manual_seed(SEED)
    return vt.create_backbone(case.model, None, num_classes=NUM_CLASSES, **dict(case.kwargs)).eval()


def fresh_base(case: Case) -> nn.Module:
    return copy.deepcopy(_base(case.id))


def inputs(case: Case, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, case.size, case.size, generator=g)
    return x, torch.tensor([0, 2])


def head_names(net: nn.Module) -> set[str]:
    head = net.get_classifier()
    heads = head if isinstance(head, (tuple, list)) else (head,)
    ids = {id(p) for h in heads for p in h.parameters()}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor), f"eval forward returned {type(out).__name__}, not logits"
    return out


@dataclass(frozen=True)
class Refused:
    """The strategy refused the model with a StrategyError (``message``)."""

    message: str


def names_strategy_and_model(message: str, strategy: str, case: Case, net: nn.Module) -> bool:
    """Whether a refusal names the strategy (as a word) and the model (timm name or class name)."""
    text = message.lower()
    names_strategy = re.search(rf"(?<![a-z_]){re.escape(strategy.lower())}(?![a-z_])", text) is not None
    names_model = case.model.lower() in text or type(net).__name__.lower() in text
    return names_strategy and names_model


# ------------------------------------------------------------------------------------------ the checks
class CellError(AssertionError):
    """A check of a cell failed (the cell is broken); ``phase`` says which."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"[{phase}] {message}")
        self.phase = phase


def _check(ok: bool, phase: str, message: str) -> None:
    if not ok:
        raise CellError(phase, message)


def _sparse_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: mask}`` from the ``<param>_sparse_mask`` buffers the sparse strategy keeps."""
    suffix = "_sparse_mask"
    return {n[: -len(suffix)]: b for n, b in net.named_buffers() if n.endswith(suffix)}


def train_two_steps(net: nn.Module, case: Case, strategy: str) -> None:
    """Two AdamW steps as TransferClassifier takes them; check what moved and what did not."""
    params = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {n for n, p in params.items() if p.requires_grad}
    head = head_names(net)
    lr = float(type(net.visiontune_strategy).default_lr)
    opt = torch.optim.AdamW(vt.param_groups(net, lr, 0.05), lr=lr)
    x, y = inputs(case)
    with_grad: set[str] = set()
    net.train()
    for _ in range(2):
        out = net(x)
        _check(isinstance(out, torch.Tensor) and out.shape == (BATCH, NUM_CLASSES), "train",
               f"training forward gave {getattr(out, 'shape', type(out).__name__)}, not ({BATCH}, {NUM_CLASSES})")
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with_grad |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        opt.step()
    _check(all(torch.isfinite(p).all() for p in params.values()), "train", "non-finite weights after 2 steps")
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    frozen_moved = sorted(changed - trainable)
    _check(not frozen_moved, "frozen", f"frozen parameters changed: {frozen_moved[:5]}")
    for name, mask in _sparse_masks(net).items():
        outside = ~mask.bool()
        _check(torch.equal(params[name].detach()[outside], before[name][outside]), "frozen",
               f"{name}: entries outside the sparse mask changed")
    _check(bool(changed & head), "head", f"the head {sorted(head)} did not change")
    beyond = sorted((changed & with_grad) - head)
    if strategy == "linear":
        _check(trainable == head, "linear", f"linear trains more than the head: {sorted(trainable - head)[:5]}")
    else:
        n_beyond = sum(params[n].numel() for n in trainable - head)
        _check(bool(beyond), "beyond-head",
               f"nothing beyond the head changed ({n_beyond} trainable entries beyond the head; with a non-zero "
               f"gradient: {sorted((with_grad & trainable) - head)[:3]})")


def round_trip(net: nn.Module, case: Case, workdir: Path) -> torch.Tensor:
    """save_delta -> build_from_delta on a fresh, identically seeded base: same eval logits."""
    net.eval()
    x, _ = inputs(case, seed=2)
    ref = logits(net, x)
    path = Path(workdir) / f"{case.id}-{net.visiontune_strategy.strategy_name}.safetensors"
    vt.save_delta(net, path, class_names=CLASSES, backbone=case.model, weights=None, bn="train",
                  backbone_args=dict(case.kwargs))
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = vt.build_from_delta(path)
    got = logits(rebuilt.eval(), x)
    diff = float((got - ref).abs().max())
    _check(diff <= ATOL_ROUND_TRIP, "round-trip", f"rebuilt logits differ by {diff:.2e} (atol {ATOL_ROUND_TRIP})")
    return ref


def _diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max())


def check_merge(net: nn.Module, case: Case, strategy: str, ref: torch.Tensor) -> None:
    """Merged (``vt.merge``) and unloaded (``vt.merge_and_unload``) networks give the trained logits."""
    x, _ = inputs(case, seed=2)
    net.eval()
    bound = ATOL_MERGE + ATOL_MERGE * float(ref.abs().max())
    if MERGE[strategy] == "merge":
        vt.merge(net)
        diff = _diff(logits(net, x), ref)
        _check(diff <= bound, "merge", f"merged logits differ by {diff:.2e} (bound {bound:.1e})")
        vt.unmerge(net)
        diff = _diff(logits(net, x), ref)
        _check(diff <= bound, "merge", f"unmerged logits differ by {diff:.2e} (bound {bound:.1e})")
        vt.merge_and_unload(net)
        diff = _diff(logits(net, x), ref)
        _check(diff <= bound, "merge", f"merge_and_unload logits differ by {diff:.2e} (bound {bound:.1e})")
    else:  # qlora: merge_and_unload bakes its own dequantised weights in
        vt.merge_and_unload(net)
        diff = _diff(logits(net, x), ref)
        scale = max(float(ref.abs().max()), 1e-6)
        _check(diff <= RTOL_QLORA_MERGE * scale, "merge",
               f"merge_and_unload logits differ by {diff:.2e} (relative {diff / scale:.2e}, "
               f"tolerance {RTOL_QLORA_MERGE})")


def run_cell(case: Case, strategy: str, workdir: Path) -> Refused | None:
    """Run one cell: ``None`` = ok, :class:`Refused` = a StrategyError at apply time; any other exception
    (including :class:`CellError` from a failed check) propagates: the cell is broken."""
    net = fresh_base(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LoRA rank capping on tiny layers
            vt.apply_strategy(net, strategy, options(strategy))
    except vt.StrategyError as exc:
        msg = str(exc)
        _check(names_strategy_and_model(msg, strategy, case, net), "refusal",
               f"the refusal does not name the strategy {strategy!r} and the model "
               f"({case.model!r} / {type(net).__name__}): {msg}")
        return Refused(msg)
    train_two_steps(net, case, strategy)
    ref = round_trip(net, case, workdir)
    if strategy in MERGE:
        check_merge(net, case, strategy, ref)
    return None
