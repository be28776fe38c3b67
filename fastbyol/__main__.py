"""`python -m fastbyol VERB ...` (what torchrun runs: torchrun ... -m fastbyol train CONFIG)."""

import sys

from fastbyol.cli import main

if __name__ == "__main__":  # DALI's spawned source workers import this module again
    sys.exit(main())
