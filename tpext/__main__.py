"""`python -m tpext demo | bench | plan`: see tpext/cli.py."""

import sys

from tpext.cli import main

sys.exit(main())
