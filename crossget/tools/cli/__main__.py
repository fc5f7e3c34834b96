"""``python -m crossget.tools.cli ...`` (e.g. under ``accelerate launch -m``)."""

import sys

from crossget.tools.cli import main

sys.exit(main())
