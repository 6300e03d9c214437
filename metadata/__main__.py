"""``python -m metadata --config FILE``: run the metadata role alone."""

import sys

from metadata.server import main

sys.exit(main())
