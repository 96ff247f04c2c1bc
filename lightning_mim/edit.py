"""`python -m lightning_mim.edit`: the documented command; the code is `lightning_mim.orchestration.edit`."""

import sys

from lightning_mim.orchestration.edit import main

if __name__ == "__main__":
    sys.exit(main())
