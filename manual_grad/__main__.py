"""``python -m manual_grad``: see :mod:`manual_grad.cli`."""
import sys

from manual_grad.cli import main

sys.exit(main())
