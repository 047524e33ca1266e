"""``python -m captum_ext.cli``: the ``captum-ext`` command."""

import sys

from captum_ext.cli import main

sys.exit(main())
