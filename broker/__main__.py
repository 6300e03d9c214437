"""``python -m broker --config FILE``: run the proxy role alone."""

import sys

from broker.proxy import main

sys.exit(main())
