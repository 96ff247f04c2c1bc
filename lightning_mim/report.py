"""`python -m lightning_mim.report`: the documented command; the code is `lightning_mim.orchestration.report`."""

import sys

from lightning_mim.orchestration.report import main

if __name__ == "__main__":
    sys.exit(main())
