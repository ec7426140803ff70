#!/usr/bin/env bash
''':'
# LAG for UL2 pretraining, end to end, through the deepspeed launcher:
#   base checkpoint -> grow with every operator of a design space -> candidate k-step jobs run
#   concurrently on slices of the allocation -> LAG@k selection -> the winner continues training.
#
# Every knob is an environment variable (defaults = the CPU demo: small preset, offline demo
# corpus, 2 local slots, 8 candidates, about 7 minutes on 2 cores). Extra arguments are passed to
# `python -m lag_ds.stacking` (see its --help). Re-running the same command resumes.
#
# The paper's UL2 setting (12 -> 16 layers, 30 operators, LAG@2000, grown at 300k, to 400k):
#   BASE_CKPT=runs/ul2_1.1b_base/checkpoints TRAIN_CONFIG=launch_scripts/configs/ul2_1.1b_base.yaml \
#   GROW_LAYERS=4 SPACE=paper LAG_STEPS=2000 EVAL_INTERVAL=100 TOTAL_STEPS=400000 \
#   HOSTFILE=/path/to/hostfile SLOTS_PER_SLICE=8 HANG_TIMEOUT=1800 launch_scripts/ul2_grow.sh
# (HANG_TIMEOUT must cover loading the checkpoint and the first validation before a job logs anything.)
#
# Two ways to start it, with the same knobs:
#   launch_scripts/ul2_grow.sh          # allocation: ALLOCATION, HOSTFILE, the SLURM job, or NUM_SLOTS here
#   deepspeed [--num_gpus N | --num_nodes N | --include/--exclude ... | --hostfile HF] launch_scripts/ul2_grow.sh
# Under the deepspeed runner, the runner's resource flags define the allocation. The runner hands
# this file to Python on every rank; the Python tail at the bottom makes rank 0 re-run it with bash
# (ALLOCATION = the resources the runner resolved) and the other ranks exit 0 at once
# (lag_ds/launch/script_entry.py). On several nodes the runner's pdsh forwards no knobs: put them
# in a script passed as `deepspeed --venv_script FILE ...` (sourced on every node), or pass flags
# after the script name (`... launch_scripts/ul2_grow.sh --lag-steps 2000`).
# This file is a bash/Python polyglot: keep the shell part free
# of three single quotes in a row.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"   # the venv's `deepspeed` runner (not the symlink target)

OUT_DIR=${OUT_DIR:-runs/lag_demo}
TRAIN_CONFIG=${TRAIN_CONFIG:-launch_scripts/configs/small_base.yaml}
BASE_CKPT=${BASE_CKPT:-}              # empty: pretrain the base first (BASE_STEPS steps)
BASE_STEPS=${BASE_STEPS:-300}
GROW_LAYERS=${GROW_LAYERS:-2}         # k in L -> L+k
SPACE=${SPACE:-"starts0=0,2;blocks=1,2;inits=duplicate,random"}
LAG_STEPS=${LAG_STEPS:-40}            # LAG@k
EVAL_INTERVAL=${EVAL_INTERVAL:-10}
SMOOTHING=${SMOOTHING:-1}
TOTAL_STEPS=${TOTAL_STEPS:-440}
SLOTS_PER_SLICE=${SLOTS_PER_SLICE:-1}
HANG_TIMEOUT=${HANG_TIMEOUT:-300}
MAX_RETRIES=${MAX_RETRIES:-0}
POLICY=${POLICY:-lag}                 # race policy: lag (LAG@k) | sh (successive halving) | settle
SH_ETA=${SH_ETA:-3}                   # sh: keep the best 1/eta at each rung
SH_MIN_STEPS=${SH_MIN_STEPS:-}        # sh: first rung (default LAG_STEPS / SH_ETA^2)
STUDY=${STUDY:-0}                     # 1: every candidate continues to TOTAL_STEPS (tools/analyze_lag.py)
DENSE_EVAL_STEPS=${DENSE_EVAL_STEPS:-0}  # validate every DENSE_EVAL_INTERVAL steps this long after growing
DENSE_EVAL_INTERVAL=${DENSE_EVAL_INTERVAL:-1}
source launch_scripts/lib/allocation.sh   # ALLOCATION from ALLOCATION / HOSTFILE / SLURM / NUM_SLOTS

args=(--out-dir "$OUT_DIR" --train-config "$TRAIN_CONFIG" --grow-layers "$GROW_LAYERS" --space "$SPACE"
      --lag-steps "$LAG_STEPS" --eval-interval "$EVAL_INTERVAL" --smoothing-window "$SMOOTHING"
      --total-steps "$TOTAL_STEPS" --allocation "$ALLOCATION" --slots-per-slice "$SLOTS_PER_SLICE"
      --hang-timeout-s "$HANG_TIMEOUT" --max-retries "$MAX_RETRIES" --policy "$POLICY" --sh-eta "$SH_ETA"
      --dense-eval-steps "$DENSE_EVAL_STEPS" --dense-eval-interval "$DENSE_EVAL_INTERVAL")
if [ -n "$SH_MIN_STEPS" ]; then args+=(--sh-min-steps "$SH_MIN_STEPS"); fi
if [ "$STUDY" = 1 ]; then args+=(--study); fi
if [ -n "$BASE_CKPT" ]; then args+=(--base-checkpoint "$BASE_CKPT"); else args+=(--base-steps "$BASE_STEPS"); fi

exec "$PYTHON" -m lag_ds.stacking "${args[@]}" "$@"
: <<'PYTHON_TAIL'
'''
# Python tail, run on every rank by `deepspeed launch_scripts/ul2_grow.sh` (see the header);
# bash never gets here (exec above) and reads it as a here-document.
import sys  # noqa: E402

from lag_ds.launch.script_entry import main  # noqa: E402

sys.exit(main(__file__, sys.argv[1:]))  # the name below ends the here-document for bash
PYTHON_TAIL

