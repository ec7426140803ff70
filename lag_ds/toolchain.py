"""One ``ninja`` for every process that JIT-loads DeepSpeed's ops.

torch's ``cpp_extension`` runs whichever ``ninja`` ``PATH`` finds first.  A box can have two: the
OS package (Debian: 1.11) and the ``ninja`` wheel pip installs next to the interpreter (1.13).
Their ``.ninja_log`` command hashes differ (ninja 1.12 changed the hash function), so each one
takes the other's build for a changed command and rebuilds ``deepspeed_shm_comm`` -- about 40 s
per job on 2 cores, over 3 minutes under load, for every job that alternates with the pytest
process or the orchestrator (seen here: the build log alternated between two hashes all day).

:func:`pin_ninja` puts the interpreter's own ``bin`` directory first on ``PATH`` when it holds a
``ninja``, so the trainer, the orchestrator's op preparation and the tests all use the same one.

Example::

    >>> pin_ninja(os.environ)                                      # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path


def pin_ninja(env: MutableMapping[str, str]) -> bool:
    """Put ``dirname(sys.executable)`` first on ``env['PATH']`` if a ``ninja`` is there.

    Returns whether it did; a no-op when that directory is already first."""
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "ninja").exists():
        return False
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if parts[:1] != [bindir]:
        env["PATH"] = os.pathsep.join([bindir, *[p for p in parts if p != bindir]])
    return True
