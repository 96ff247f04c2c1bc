"""`python -m lightning_mim.data.prepare`: the documented command; the code is `lightning_mim.orchestration.prepare`."""

import sys

from lightning_mim.orchestration.prepare import main

if __name__ == "__main__":
    sys.exit(main())
