"""`python -m attnc`: the same as the `attnc` console script."""

import sys

from attnc.cli import main

sys.exit(main())
