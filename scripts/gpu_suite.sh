#!/usr/bin/env bash
# The whole GPU suite on a GPU host, in one command, from the repository root:
#     bash scripts/gpu_suite.sh [RANKS...]          (default: 2 3 4, as many as there are GPUs)
# Logs go to ${OUT:-gpu-logs}/; one summary line per rank; exit non-zero if anything failed.
# Uses the host's own MPI (never install an MPI wheel there) and picks GPUs from the
# node-local rank, not CUDA_VISIBLE_DEVICES.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
LOGS=${OUT:-gpu-logs}
mkdir -p "$LOGS"
gpus=$(nvidia-smi -L | grep -c '^GPU')
ranks=("$@")
[ ${#ranks[@]} -gt 0 ] || ranks=(2 3 4)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | sed 's/^/gpu: /'
fail=0
# every stage is bounded: a hang becomes a failure with a stack dump, never a stuck host
mpirun() { timeout "${STAGE_TIMEOUT:-400}" mpiexec --allow-run-as-root --bind-to none -n "$@"; }
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120 --timeout-method thread)
for g in "${ranks[@]}"; do
  if [ "$g" -gt "$gpus" ]; then echo "SKIPPED G=$g: only $gpus GPUs here"; continue; fi
  echo "=== G=$g: pytest tests/gpu"
  mpirun "$g" python3 scripts/rank_pytest.py "$LOGS" gpu -- -q "${per_test[@]}" tests/gpu || fail=1
  echo "=== G=$g: check (ipc, nccl) bf16"
  for t in ipc nccl; do
    mpirun "$g" python3 -m cupy_qknorm check --transport $t \
      $( [ $((1024 % g)) -eq 0 ] || echo --k-dim 1536 ) 2>&1 | tail -1 | sed "s/^/G=$g $t: /"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  done
done
if [ "${SANITIZE:-1}" = 1 ] && [ "$gpus" -ge 2 ]; then
  echo "=== compute-sanitizer memcheck, G=2, check --transport ipc"
  mpirun 2 compute-sanitizer --tool memcheck --error-exitcode 9 --log-file "$LOGS/memcheck-rank%q{OMPI_COMM_WORLD_RANK}.log" \
    python3 -m cupy_qknorm check --transport ipc --tokens 1,7,300,3000 --max-tokens 1024 > "$LOGS/memcheck.out" 2>&1
  rc=$?
  tail -1 "$LOGS/memcheck.out"; grep -h "ERROR SUMMARY" "$LOGS"/memcheck-rank*.log | sed 's/^/memcheck: /'
  [ $rc -eq 0 ] || { echo "memcheck FAILED (exit $rc)"; fail=1; }
fi
[ $fail -eq 0 ] && echo "GPU SUITE PASSED" || echo "GPU SUITE FAILED"
exit $fail
