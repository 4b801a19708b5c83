"""``python -m kvstash.cli``: the same as the ``kvstash`` command."""

import sys

from kvstash.cli.main import main

sys.exit(main())
