"""The network side: timm backbones (:mod:`~visiontune.models.backbones`), timm's depth groups
(:mod:`~visiontune.models.groups`) and the protocols objectives type the model against
(:mod:`~visiontune.models.protocols`). Public names are importable from :mod:`visiontune`."""
