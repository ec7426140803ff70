# Sourced by the launch scripts: the allocation of a run started with bash, as the
# `--allocation` string of lag_ds (the deepspeed-runner entry sets ALLOCATION itself):
# ALLOCATION if set, else HOSTFILE, else the SLURM job, else NUM_SLOTS slots here.
if [ -n "${ALLOCATION:-}" ]; then
  :                                   # local:N | hostfile:PATH | include:HOST:IDS[@...] | slurm
elif [ -n "${HOSTFILE:-}" ]; then
  ALLOCATION="hostfile:$HOSTFILE"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  ALLOCATION=slurm
else
  ALLOCATION="local:${NUM_SLOTS:-2}"
fi
