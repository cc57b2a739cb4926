"""Training objectives beyond plain cross-entropy: FixMatch (maths in :mod:`~visiontune.objectives.semisup`
and :mod:`~visiontune.objectives.semisup_state`, the Lightning side in :mod:`~visiontune.objectives.fixmatch`)
and adding classes (:mod:`~visiontune.objectives.classes`, :mod:`~visiontune.objectives.expansion`).
Public names are importable from :mod:`visiontune`."""
