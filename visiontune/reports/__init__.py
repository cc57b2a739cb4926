"""The run report a person looks at: one self-contained ``report.html`` per run directory.

* :mod:`.runfiles`: reads what a run directory holds (``metrics.json``, ``metrics.csv``, ``class_names.json``,
  ``split.json``, ``confusion_matrix_<split>.csv`` / ``.png``, ``predictions_<split>.csv``, ``config.yaml``) and
  writes ``predictions_<split>.csv``;
* :mod:`.plots`: the matplotlib (Agg) figures as PNG bytes: confusion matrix, learning curves;
* :mod:`.gallery`: thumbnails of the misclassified images, as data URIs;
* :mod:`.page`: the page frame (inline CSS, the small table-sorting script, tables, escaping);
* :mod:`.html`: :func:`~visiontune.reports.html.build_report`, the page itself;
* :mod:`.cli`: ``visiontune report RUN_DIR`` (rebuilds the page from the run directory's files).

Nothing on the page is fetched from the network: styles and script are inline, images are data URIs.
"""
