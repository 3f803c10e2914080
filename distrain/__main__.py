"""`python -m distrain ...` is the same as the `distrain` command."""

import sys

from distrain.cli import main

sys.exit(main())
