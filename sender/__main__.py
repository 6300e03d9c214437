"""``python -m sender --config FILE --index N``: run one sender alone."""

import sys

from sender.server import main

sys.exit(main())
