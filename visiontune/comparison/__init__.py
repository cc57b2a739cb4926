"""``visiontune compare``: the command and :func:`~visiontune.comparison.api.compare`
(:mod:`~visiontune.comparison.api`), one run (:mod:`~visiontune.comparison.run`) and the leaderboard files
(:mod:`~visiontune.comparison.report`). ``vt.compare`` / ``vt.compare_from_config`` are the public entry points."""
