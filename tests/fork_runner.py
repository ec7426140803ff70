"""Run ``tools/grow_checkpoint.py`` many times cheaply: fork it from a warmed-up interpreter.

Why: the fault tests run the surgery ~40 times; a fresh interpreter pays ~3 s of imports (torch,
and deepspeed for the safe-load allow-list) every time, which is most of the test's cost on a
2-core box. ``python fork_runner.py`` imports the tool and its format modules once, then for each
request (one JSON line on stdin: ``{"argv": [...], "env": {...}, "out": PREFIX}``) forks a child
that applies the environment, sends its stdout/stderr to ``PREFIX.out`` / ``PREFIX.err`` and
exits with ``main(argv)``'s code — the tool's real entry point, in its own process, so a
``SIGKILL`` from a fault point kills only that child. The parent answers with one line
``FORKRUN <returncode>`` (negative: killed by that signal, as ``subprocess`` reports it).
``argv[0] == "materialise"`` runs ``materialise_candidate(BASE, DST, plan(OP))`` instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("grow_checkpoint_tool",
                                                  REPO / "tools/grow_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _materialise(base: str, dst: str, op: str) -> int:
    from lag_ds.checkpoint.universal_links import materialise_candidate
    from lag_ds.growth import parse_operator, plan_growth

    materialise_candidate(Path(base), Path(dst), plan_growth(parse_operator(op), 2, seed=0))
    return 0


def _child(request: dict, tool) -> int:
    for key in [k for k in os.environ if k.startswith("LAG_DS_FAULT_")]:
        del os.environ[key]
    os.environ.update(request.get("env", {}))
    for fd, suffix in ((1, ".out"), (2, ".err")):
        target = os.open(request["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    argv = request["argv"]
    try:
        return _materialise(*argv[1:]) if argv[0] == "materialise" else tool.main(argv)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - an uncaught error, reported as Python would
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    tool = _load_tool()
    # what the tool would import lazily: every format's reader and writer, and the allow-list
    import safetensors.torch  # noqa: F401

    import lag_ds.checkpoint.builtin_formats  # noqa: F401
    import lag_ds.checkpoint.deepspeed_grow  # noqa: F401
    import lag_ds.checkpoint.deepspeed_pipe_grow  # noqa: F401
    import lag_ds.checkpoint.grow  # noqa: F401
    import lag_ds.checkpoint.hf_safetensors  # noqa: F401
    import lag_ds.checkpoint.universal_links  # noqa: F401
    from lag_ds.checkpoint.safe_load import _deepspeed_allow_list

    _deepspeed_allow_list()
    print("FORKRUN ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request, tool))
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"FORKRUN {code}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    serve()
