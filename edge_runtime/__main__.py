"""`python -m edge_runtime` is the `edge-runtime` command."""

import sys

from edge_runtime.serving.cli import main

sys.exit(main())
