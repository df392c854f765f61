"""``python -m clipfast.gpu_check OUT``: the GPU check (``run.main``; what bench/gpu_suite.sh runs)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
