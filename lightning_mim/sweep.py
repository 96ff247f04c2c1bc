"""`python -m lightning_mim.sweep`: the documented command; the code is `lightning_mim.orchestration.sweep`."""

import sys

from lightning_mim.orchestration.sweep import main

if __name__ == "__main__":
    sys.exit(main())
