#!/usr/bin/env bash
# The benchmark tables of BENCHMARKS.md on a GPU host, from the repository root:
#     bash scripts/gpu_bench.sh [G...]          (default: 1 and every G from 2 up to the GPUs)
# Per G: `bench --in-place --rope` in graph and eager mode (fused norm, norm + RoPE fused,
# norm then a separate RoPE kernel, the nccl path, the floors), one table per G on stdout
# and its JSON in ${BENCH_OUT:-bench-out}/ (or $OUT when set). TOKENS overrides the
# token counts, MODE the modes (default both), COMMIT the commit printed (default: git's).
# Uses the host's MPI; GPUs come from the node-local rank.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=${OUT:-${BENCH_OUT:-bench-out}}
mkdir -p "$out"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ranks=("$@")
if [ ${#ranks[@]} -eq 0 ]; then
  ranks=(1)
  for ((g = 2; g <= gpus; g++)); do ranks+=("$g"); done
fi
tokens=${TOKENS:-1,8,64,512,1024,2048,4096,8192,16384}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')
fail=0
for g in "${ranks[@]}"; do
  if [ "$g" -gt "$gpus" ]; then echo "SKIPPED G=$g: only $gpus GPUs here"; continue; fi
  transports=ipc,nccl
  echo "=== G=$g: bench --in-place --rope --mode ${MODE:-both} --tokens $tokens"
  timeout "${STAGE_TIMEOUT:-500}" mpiexec --allow-run-as-root --bind-to none -n "$g" \
    python3 -m cupy_qknorm bench --in-place --rope --mode "${MODE:-both}" --tokens "$tokens" \
    --transports "$transports" --exchange-floor ${COMMIT:+--commit "$COMMIT"} \
    --json "$out/bench-$card-G$g.json" || fail=1
done
exit $fail
