#!/bin/bash
# Submits a partitioned lorastream run to Slurm: a job array of N parts, then the stitch
# as a job that starts only when every part succeeded (afterok). A failed part leaves the
# stitch pending with DependencyNeverSatisfied: rerun that task
# (`scontrol requeue <jobid>_<K>`) or cancel and resubmit.
#
#   contrib/slurm/submit.sh N OUT/ merge --base /shared/base/ --lora /shared/adapter/
#   contrib/slurm/submit.sh N OUT/ convert /shared/ckpt/
#
# Extra sbatch options for the parts go in SBATCH_PART_OPTS (e.g. "--partition=cpu").
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 N OUT/ merge|convert ARGS..." >&2
    exit 2
fi
N=$1 OUT=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
LORASTREAM=${LORASTREAM:-lorastream}
# shellcheck disable=SC2086
parts=$(sbatch --parsable --array=0-$((N - 1)) ${SBATCH_PART_OPTS:-} \
    --export=ALL,OUT="$OUT",LORASTREAM="$LORASTREAM" "$HERE/lorastream-parts.sbatch" "$@")
parts=${parts%%;*}
stitch=$(sbatch --parsable --dependency=afterok:"$parts" --job-name=lorastream-stitch \
    --output=lorastream-stitch-%j.out --wrap "$LORASTREAM stitch '$OUT' --json")
echo "parts: job array $parts ($N tasks); stitch: job $stitch (after all parts succeed)"
