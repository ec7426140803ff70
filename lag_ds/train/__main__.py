"""``python -m lag_ds.train --config RUN.yaml [--set key=value ...]`` (also under ``deepspeed --module``).

Exit codes: 0 done, 2 bad configuration/input (one line naming it), 3 non-finite loss.
"""

from __future__ import annotations

import sys

from lag_ds.train.main import main

if __name__ == "__main__":
    sys.exit(main())
