"""``python -m blendedit``: the same command line as ``blendedit``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
