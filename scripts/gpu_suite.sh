#!/usr/bin/env bash
# The whole GPU suite on a GPU host, in one command, from the repository root:
#     bash scripts/gpu_suite.sh [RANKS...]          (default: 2 3 4, as many as there are GPUs)
# Per G: the GPU tests (parity, graphs, faults), check ipc/nccl, and the SIGKILL fault.
# Then compute-sanitizer memcheck and racecheck at G=2 (SANITIZE=0 skips them), and with
# SOAK=1 the construct/close cycles and the soak at the largest G (RELIABILITY.md).
# Logs go to ${GPU_LOGS:-gpu-logs}/ (and, when $OUT is set, as one archive to
# $OUT/gpu-logs.tgz); one summary line per rank; exit non-zero if anything failed.
# Uses the host's own MPI (never install an MPI wheel there) and picks GPUs from the
# node-local rank, not CUDA_VISIBLE_DEVICES. On a host with fewer GPUs than ranks,
# QKNORM_TEST_SHARED_GPU=1 runs the pytest stage with ranks sharing GPUs (correctness
# only: tests/gpu/conftest.py) and memcheck on the RoPE tests; the other stages need a
# GPU per rank and are skipped.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
LOGS=${GPU_LOGS:-gpu-logs}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
export QKNORM_TEST_FAULT_LOG="$LOGS/faults.jsonl"
rm -f "$QKNORM_TEST_FAULT_LOG"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ranks=("$@")
[ ${#ranks[@]} -gt 0 ] || ranks=(2 3 4)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
fail=0
# every stage is bounded: a hang becomes a failure with a stack dump, never a stuck host
mpirun() { timeout "${STAGE_TIMEOUT:-400}" mpiexec --allow-run-as-root --bind-to none -n "$@"; }
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120 --timeout-method thread)
largest=0
shared=${QKNORM_TEST_SHARED_GPU:-0}
for g in "${ranks[@]}"; do
  if [ "$g" -gt "$gpus" ] && [ "$shared" != 1 ]; then
    echo "SKIPPED G=$g: only $gpus GPUs here"; continue
  fi
  [ "$g" -gt "$largest" ] && largest=$g
  echo "=== G=$g: pytest tests/gpu"
  mpirun "$g" python3 scripts/rank_pytest.py "$LOGS" gpu -- -q "${per_test[@]}" tests/gpu || fail=1
  if [ "$g" -gt "$gpus" ]; then
    echo "=== G=$g on $gpus GPU(s), shared: compute-sanitizer memcheck on the RoPE tests"
    mpirun "$g" compute-sanitizer --tool memcheck --error-exitcode 9 \
      --log-file "$LOGS/memcheck-shared-rank%q{OMPI_COMM_WORLD_RANK}.log" \
      python3 scripts/rank_pytest.py "$LOGS" memcheck-shared -- -q \
      tests/gpu/test_rope.py -k "parity and bfloat16-None or each_layout or outside" || fail=1
    grep -h "ERROR SUMMARY" "$LOGS"/memcheck-shared-rank*.log | sed "s/^/memcheck shared: /"
    continue
  fi
  echo "=== G=$g: check (ipc, nccl) bf16, without and with RoPE"
  for t in ipc nccl; do
    for rope in "" --rope; do
      mpirun "$g" python3 -m cupy_qknorm check --transport $t $rope 2>&1 | tail -1 |
        sed "s/^/G=$g $t $rope: /"
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
    done
  done
  for t in ipc nccl; do
    [ "$g" -ge 2 ] || break
    echo "=== G=$g $t: one rank SIGKILLed mid-loop: the job must end non-zero, not hang"
    start=$(date +%s%N)
    timeout 120 mpiexec --allow-run-as-root --bind-to none -n "$g" \
      python3 scripts/fault_kill.py --transport $t > "$LOGS/kill-$t-G$g.log" 2>&1
    rc=$?
    took=$(( ($(date +%s%N) - start) / 1000000 ))
    grep -h "^rank" "$LOGS/kill-$t-G$g.log" | sed "s/^/G=$g $t kill: /"
    echo "G=$g $t kill: mpiexec exit $rc after ${took} ms (124 = hung until timeout)"
    { [ $rc -ne 0 ] && [ $rc -ne 124 ]; } || { echo "G=$g $t kill: FAILED"; fail=1; }
  done
done
if [ "${SANITIZE:-1}" = 1 ] && [ "$gpus" -ge 2 ] && [ "$shared" != 1 ]; then
  for tool in memcheck racecheck; do
    # T=1 and 7 take the narrow layout, 300 and the chunks of 3000 the wide one (rows
    # staged in shared memory): both layouts of the fused kernel run under the tool
    for rope in "" --rope; do
      echo "=== compute-sanitizer $tool, G=2, check --transport ipc $rope, both layouts"
      CUPY_QKNORM_WIDE_FROM=300 mpirun 2 compute-sanitizer --tool $tool --error-exitcode 9 \
        --log-file "$LOGS/$tool$rope-rank%q{OMPI_COMM_WORLD_RANK}.log" \
        python3 -m cupy_qknorm check --transport ipc $rope --tokens 1,7,300,3000 \
        --max-tokens 1024 > "$LOGS/$tool$rope.out" 2>&1
      rc=$?
      tail -1 "$LOGS/$tool$rope.out"
      grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$LOGS"/$tool$rope-rank*.log |
        sed "s/^/$tool $rope: /"
      [ $rc -eq 0 ] || { echo "$tool $rope FAILED (exit $rc)"; fail=1; }
    done
  done
fi
if [ "${SOAK:-0}" = 1 ] && [ "$largest" -ge 2 ] && [ "$shared" != 1 ]; then
  echo "=== G=$largest: ${CYCLES:-500} construct/close cycles"
  mpirun "$largest" python3 scripts/cycles.py --cycles "${CYCLES:-500}" || fail=1
  echo "=== G=$largest: soak, ${SOAK_CALLS:-1000000} calls eager and in graphs"
  STAGE_TIMEOUT=${SOAK_TIMEOUT:-900} mpirun "$largest" python3 scripts/soak.py \
    --calls "${SOAK_CALLS:-1000000}" || fail=1
fi
[ "$largest" -gt 0 ] || { echo "no G could run here ($gpus GPUs): nothing was tested"; fail=1; }
[ -s "$LOGS/faults.jsonl" ] && sed 's/^/fault: /' "$LOGS/faults.jsonl"
# one file, so that a runner that fetches few files back gets every log
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-logs.tgz" -C "$LOGS" . && echo "logs: $OUT/gpu-logs.tgz"
[ $fail -eq 0 ] && echo "GPU SUITE PASSED" || echo "GPU SUITE FAILED"
exit $fail
