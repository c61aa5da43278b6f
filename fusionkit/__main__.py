"""``python -m fusionkit``: the ``fusionkit`` command."""

from __future__ import annotations

import sys

from fusionkit.cli import main

sys.exit(main())
