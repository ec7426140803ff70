#!/usr/bin/env bash
''':'
# Adaptive gradual stacking (paper section 4.2): train a model in stages, and at every stage race
# a design space of growth operators for k steps (LAG@k) and continue the winner. With
# BASELINE=last the same schedule also runs with last stacking (duplicate the final b layers on
# top at every stage, Reddi et al.), sharing stage 1, and both final losses are printed.
#
# Every knob is an environment variable (defaults = the CPU default: the small preset grown
# 2 -> 4 -> 6 -> 8 layers, 2 local slots, about 20 minutes on 2 cores with BASELINE=last). Extra
# arguments go to `python -m lag_ds.stacking.adaptive` (see its --help). Re-running resumes.
#
#   launch_scripts/adaptive_stack.sh                                   # CPU default
#   SCHEDULE=launch_scripts/configs/stacking/bert_large_paper.yaml launch_scripts/adaptive_stack.sh --dry-run
#   deepspeed --hostfile HF launch_scripts/adaptive_stack.sh            # the runner's allocation
# Under the deepspeed runner, rank 0 orchestrates with the allocation the runner resolved and the
# other ranks exit (lag_ds/launch/script_entry.py; on several nodes pass knobs via --venv_script).
# This file is a bash/Python polyglot: keep the shell part free of three single quotes in a row.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"   # the venv's `deepspeed` runner and ninja

OUT_DIR=${OUT_DIR:-runs/adaptive}
SCHEDULE=${SCHEDULE:-launch_scripts/configs/stacking/small_cpu.yaml}
BASELINE=${BASELINE:-last}           # last | none
SLOTS_PER_SLICE=${SLOTS_PER_SLICE:-1}
HANG_TIMEOUT=${HANG_TIMEOUT:-300}
MAX_RETRIES=${MAX_RETRIES:-0}
source launch_scripts/lib/allocation.sh   # ALLOCATION from ALLOCATION / HOSTFILE / SLURM / NUM_SLOTS

exec "$PYTHON" -m lag_ds.stacking.adaptive --schedule "$SCHEDULE" --out-dir "$OUT_DIR" \
  --baseline "$BASELINE" --allocation "$ALLOCATION" --slots-per-slice "$SLOTS_PER_SLICE" \
  --hang-timeout-s "$HANG_TIMEOUT" --max-retries "$MAX_RETRIES" "$@"
: <<'PYTHON_TAIL'
'''
# Python tail, run on every rank by `deepspeed launch_scripts/adaptive_stack.sh` (see the header);
# bash never gets here (exec above) and reads it as a here-document.
import sys  # noqa: E402

from lag_ds.launch.script_entry import main  # noqa: E402

sys.exit(main(__file__, sys.argv[1:]))  # the name below ends the here-document for bash
PYTHON_TAIL
