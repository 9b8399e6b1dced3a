"""``python -m kernelwarehouse.cli``: the kw command (also what torchrun runs)."""

import sys

from . import main

sys.exit(main())
