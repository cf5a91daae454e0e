"""``python -m blendedit.toy.train``: the trainers' command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
