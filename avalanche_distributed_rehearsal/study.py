"""``python -m avalanche_distributed_rehearsal.study``: the trade-off study (see ``--help``
and :mod:`avalanche_distributed_rehearsal.app.study`)."""

import sys

from avalanche_distributed_rehearsal.app.study import main

if __name__ == "__main__":
    sys.exit(main())
