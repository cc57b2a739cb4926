"""``python -m visiontune.cli ...``: the ``visiontune`` command."""

import sys

from .main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
