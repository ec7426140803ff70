"""Keep a benchmark's stdout for its JSON alone.

Why: DeepSpeed prints to stdout (the accelerator warning, "op built successfully", the output of
the ninja subprocesses it starts), which would corrupt the JSON files `make bench` writes. After
:func:`keep_stdout_for_json`, everything written to file descriptor 1 -- by this process or the
children it starts -- goes to stderr; the returned function prints JSON on the real stdout.

    emit = keep_stdout_for_json()
    ...  # the work, as noisy as it likes
    emit(report)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any


def keep_stdout_for_json() -> Callable[[Any], None]:
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def emit(report: Any) -> None:
        real.write(json.dumps(report, indent=1) + "\n")
        real.flush()

    return emit
