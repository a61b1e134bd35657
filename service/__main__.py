"""`python -m service`: run the sampling service with uvicorn (settings from MHCFLASH_* variables).

A start-up failure (bad settings, weights, device or port) prints one line and exits 2: see
`service.startup`.
"""

from __future__ import annotations

import sys

from service.startup import main

if __name__ == "__main__":
    sys.exit(main())
