"""``python -m p2pbackup.cli``: the ``p2pbackup`` command."""

import sys

from p2pbackup.cli.main import main

sys.exit(main())
