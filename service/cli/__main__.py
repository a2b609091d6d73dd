"""`python -m service.cli …` runs the `fisherguard` command."""

import sys

from service.cli import main

sys.exit(main())
