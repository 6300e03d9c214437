"""``python -m frontend --config FILE --index N``: run one frontend alone."""

import sys

from frontend.server import main

sys.exit(main())
