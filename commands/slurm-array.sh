#!/usr/bin/env bash
# Segment a corpus with a Slurm job array: N tasks, each `lungkit segment --shard K/N` into one output folder
# on a shared filesystem, then one dependent job that writes the manifest with `lungkit merge`.
#
#   bash commands/slurm-array.sh /shared/mimic-cxr-jpg/files /shared/out/mimic 32 [extra segment options...]
#
# Each task segments its own images (an image belongs to shard hash(path) mod N) and resumes if resubmitted:
# `sbatch --array=K-1 ...` for a task that failed. A task that ran out of time or was preempted is simply run
# again. On GPU nodes add --gres=gpu:1 (the model then runs on the GPU and gray JPEGs decode with nvJPEG).
# Set SBATCH_PARTITION / SBATCH_ACCOUNT in the environment as your site requires.
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"  # the README's set-up venv, active or not
if [ $# -lt 3 ]; then
  echo "usage: $0 DIR OUT N [segment options...]" >&2
  exit 2
fi
dir=$1 out=$2 n=$3
shift 3
extra=$(printf ' %q' "$@")  # further segment options, quoted for the job's shell
mkdir -p "$out/slurm-logs"
cpus=${LUNGKIT_CPUS_PER_TASK:-8}

# every task must use the same N and the same options: merge refuses shards run with different settings
array=$(sbatch --parsable --array=0-$((n - 1)) --cpus-per-task="$cpus" --mem="${LUNGKIT_MEM:-16G}" \
  --time="${LUNGKIT_TIME:-04:00:00}" --job-name=lungkit-segment --output="$out/slurm-logs/%A_%a.log" \
  --wrap "lungkit segment '$dir' -o '$out' --shard \$((SLURM_ARRAY_TASK_ID + 1))/$n -q$extra")
echo "submitted segment array $array ($n tasks)"

# afterany: merge runs once every task has ended; it says which shard did not finish if one failed
merge=$(sbatch --parsable --dependency="afterany:$array" --cpus-per-task=2 --mem=8G --time=01:00:00 \
  --job-name=lungkit-merge --output="$out/slurm-logs/merge-%j.log" --wrap "lungkit merge '$out' --report")
echo "submitted merge $merge (after $array): manifest at $out/manifest.parquet, QC page at $out/report/index.html"
