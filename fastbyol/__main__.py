"""`python -m fastbyol VERB ...` (what torchrun runs: torchrun ... -m fastbyol train CONFIG)."""

import sys

from fastbyol.cli import main

sys.exit(main())
