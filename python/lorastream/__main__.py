"""``python -m lorastream``: the lorastream command."""

import sys

from . import main

sys.exit(main())
