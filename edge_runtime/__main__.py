"""`python -m edge_runtime` is the `edge-runtime` command."""

import sys

from .cli import main

sys.exit(main())
