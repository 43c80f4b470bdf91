"""``python -m simmim.visualize``: see :mod:`simmim.visualize.cli`."""

import sys

from simmim import runtime

if __name__ == "__main__":
    runtime.prepare_process()  # before torch loads (below)
    from simmim.visualize.cli import main

    sys.exit(main())
