"""`python -m lightning_mim.tokenize`: the documented command; the code is `lightning_mim.orchestration.tokenize`."""

import sys

from lightning_mim.orchestration.tokenize import main

if __name__ == "__main__":
    sys.exit(main())
