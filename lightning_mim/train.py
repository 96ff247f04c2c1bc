"""`python -m lightning_mim.train`: the documented command; the code is `lightning_mim.orchestration.train`."""

import sys

from lightning_mim.orchestration.train import main

if __name__ == "__main__":
    sys.exit(main())
