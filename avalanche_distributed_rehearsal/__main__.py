"""``python -m avalanche_distributed_rehearsal``: the class-incremental main job (see ``--help``)."""

import sys

from avalanche_distributed_rehearsal.app.main import main

if __name__ == "__main__":
    sys.exit(main())
