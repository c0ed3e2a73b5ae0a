"""`python -m upcycle_fx ...` is the `upcycle-fx` command."""

import sys

from .cli import main

sys.exit(main())
