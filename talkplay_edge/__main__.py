"""``python -m talkplay_edge …``: the ``talkplay`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a `talkplay eval --jobs` process imports it
    sys.exit(main())
