"""`python -m lightning_mim.evaluate`: the documented command; the code is `lightning_mim.orchestration.evaluate`."""

import sys

from lightning_mim.orchestration.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
