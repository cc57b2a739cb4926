"""Training: ``TransferClassifier`` (:mod:`~visiontune.training.module`) and what it trains with: parameter
groups and learning rates (``optim``), BatchNorm policy (``bn``), weight EMA (``ema``), checkpoints
(``checkpoint``), run reports (``report``), the frozen-feature cache (``cache``) and option blocks
(``options``). Public names are importable from :mod:`visiontune`; this package imports none of them."""
