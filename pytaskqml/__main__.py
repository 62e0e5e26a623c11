"""``python -m pytaskqml``: the same as the ``pytaskqml`` command."""

import sys

from .cli.main import main

sys.exit(main())
