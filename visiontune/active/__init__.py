"""Active learning: which photos of an unlabeled pool to label next (``visiontune suggest``).

* :mod:`.uncertain`: uncertainty scores (margin, entropy) and k-center greedy among the most uncertain images;
* :mod:`.novelty`: novelty against class prototypes, Otsu's threshold, k-means clusters of the novel images;
* :mod:`.sheets`: contact sheets (PNG grids of thumbnails), one per cluster;
* :mod:`.suggest`: :func:`~.suggest.suggest` (the Python API) and the ``visiontune suggest`` command.

Example:
    >>> import visiontune as vt
    >>> r = vt.suggest("last.ckpt", "pool/", n=20, output="suggest.csv")  # doctest: +SKIP
"""
