"""`python -m splitlm.cli`."""

import sys

from splitlm.cli import main

sys.exit(main())
