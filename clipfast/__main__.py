"""``python -m clipfast ...``: the same as ``python -m clipfast.cli ...`` (the ``clipfast`` command)."""
import sys

from clipfast.cli import main

sys.exit(main())
