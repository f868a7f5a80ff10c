#!/usr/bin/env bash
# The whole GPU suite on a GPU host, in one command, from the repository root:
#     bash scripts/gpu_suite.sh [RANKS...]    (default: 2 3 4; 1 2 3 on a host with one GPU)
# First NVRTC builds every shipped kernel specialization (CI builds a sample; COMPILE=0
# skips it). Per G: the GPU tests (parity, graphs, faults), check ipc/nccl (the norm, +
# RoPE, + a bf16 or FP8 KV cache, the minimax-m2 preset; with jax installed check --jax),
# the SIGKILL fault. Then compute-sanitizer memcheck and racecheck on check --transport ipc
# (the norm, + RoPE, + an FP8 KV cache) at G=2 (at G=1 on a host with one GPU; SANITIZE=0
# skips them), and with SOAK=1 the construct/close
# cycles and the soak at the largest G with a GPU per rank (RELIABILITY.md).
# A G beyond the GPUs runs with ranks sharing them (say QKNORM_TEST_SHARED_GPU=0 to skip
# it instead): the GPU tests under tests/gpu/conftest.py's emulation (correctness only;
# the tests that need "nccl" skip there, NCCL refuses two ranks on one GPU) and memcheck
# on the RoPE tests; check, SIGKILL and the soak need a GPU per rank and say so.
# Sanitizer counts cover this package's kernels and errors no one can be named for; NCCL's
# own are listed and excluded (scripts/rank_pytest.py --sanitizer).
# Logs go to ${GPU_LOGS:-gpu-logs}/ (and, when $OUT is set, as one archive to
# $OUT/gpu-logs.tgz); one summary line per rank; exit non-zero if anything failed.
# Uses the host's own MPI (never install an MPI wheel there) and picks GPUs from the
# node-local rank, not CUDA_VISIBLE_DEVICES.
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
# the suite sets the emulation switch itself, per G, where ranks share GPUs
share=${QKNORM_TEST_SHARED_GPU:-1}
unset QKNORM_TEST_SHARED_GPU
ranks=("$@")
if [ ${#ranks[@]} -eq 0 ]; then
  if [ "$gpus" -eq 1 ]; then ranks=(1 2 3); else ranks=(2 3 4); fi
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
echo "G = ${ranks[*]} on $gpus GPU(s)"
fail=0
# every stage is bounded: a hang becomes a failure with a stack dump, never a stuck host
mpirun() { timeout "${STAGE_TIMEOUT:-400}" mpiexec --allow-run-as-root --bind-to none -n "$@"; }
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120 --timeout-method thread)
# counts each rank's sanitizer log by whose kernel an error is in; fails on ours
sanitizer_counts() {
  local tool=$1; shift
  python3 scripts/rank_pytest.py --sanitizer "$@" | sed "s/^/$tool: /"
  [ "${PIPESTATUS[0]}" -eq 0 ] ||
    { echo "$tool: FAILED (errors in this package's kernels, or unattributed)"; fail=1; }
}

if [ "${COMPILE:-1}" = 1 ]; then
  echo "=== NVRTC: every shipped kernel specialization (python3 -m cupy_qknorm compile)"
  timeout "${COMPILE_TIMEOUT:-900}" python3 -m cupy_qknorm compile > "$LOGS/compile.log" 2>&1
  rc=$?
  tail -1 "$LOGS/compile.log" | sed 's/^/compile: /'
  [ $rc -eq 0 ] || { echo "compile: FAILED (exit $rc; $LOGS/compile.log)"; fail=1; }
fi

largest=0   # the largest G that ran
own=0       # the largest G with a GPU per rank
for g in "${ranks[@]}"; do
  shared=0
  if [ "$gpus" -eq 0 ]; then
    echo "SKIPPED G=$g: no GPU here"; continue
  elif [ "$g" -gt "$gpus" ]; then
    if [ "$share" = 0 ]; then
      echo "SKIPPED G=$g: only $gpus GPU(s) here, and QKNORM_TEST_SHARED_GPU=0"; continue
    fi
    shared=1
  fi
  [ "$g" -gt "$largest" ] && largest=$g
  if [ $shared = 1 ]; then
    echo "=== G=$g: pytest tests/gpu, $g ranks sharing $gpus GPU(s) (QKNORM_TEST_SHARED_GPU=1:" \
         "correctness only; the tests that need nccl skip)"
    QKNORM_TEST_SHARED_GPU=1 mpirun "$g" python3 scripts/rank_pytest.py "$LOGS" gpu -- -q \
      "${per_test[@]}" tests/gpu || fail=1
    if [ "${SANITIZE:-1}" = 1 ]; then
      echo "=== G=$g shared: compute-sanitizer memcheck on the RoPE tests"
      QKNORM_TEST_SHARED_GPU=1 mpirun "$g" compute-sanitizer --tool memcheck \
        --log-file "$LOGS/memcheck-shared-G$g-rank%q{OMPI_COMM_WORLD_RANK}.log" \
        python3 scripts/rank_pytest.py "$LOGS" memcheck-shared -- -q \
        tests/gpu/test_rope.py -k "parity and bfloat16-None or each_layout or outside" || fail=1
      sanitizer_counts "memcheck shared G=$g" "$LOGS"/memcheck-shared-G$g-rank*.log
    fi
    echo "SKIPPED G=$g check (ipc, nccl) and SIGKILL: they need a GPU per rank (NCCL refuses" \
         "two ranks on one GPU; check has no shared-GPU emulation)"
    continue
  fi
  [ "$g" -gt "$own" ] && own=$g
  echo "=== G=$g: pytest tests/gpu"
  mpirun "$g" python3 scripts/rank_pytest.py "$LOGS" gpu -- -q "${per_test[@]}" tests/gpu || fail=1
  echo "=== G=$g: check (ipc, nccl) bf16: the norm, + RoPE, + the KV cache (bf16, fp8), a preset"
  for t in ipc nccl; do
    for what in "" --rope "--rope --kv-cache bf16" "--rope --kv-cache fp8" \
                "--model minimax-m2"; do
      mpirun "$g" python3 -m cupy_qknorm check --transport $t $what 2>&1 | tail -1 |
        sed "s/^/G=$g $t $what: /"
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
    done
  done
  if python3 -c "import jax" 2>/dev/null; then
    echo "=== G=$g: check --jax (ipc), + RoPE and the fp8 KV cache"
    mpirun "$g" python3 -m cupy_qknorm check --jax --transport ipc --rope --kv-cache fp8 2>&1 |
      tail -1 | sed "s/^/G=$g jax: /"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
  else
    echo "SKIPPED G=$g check --jax: no jax here"
  fi
  if [ "$g" -lt 2 ]; then
    echo "SKIPPED G=$g SIGKILL: it needs a peer to kill"; continue
  fi
  for t in ipc nccl; do
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

if [ "${SANITIZE:-1}" = 1 ]; then
  # G=2 needs a GPU per rank (check has no shared-GPU emulation); one GPU: G=1
  sg=2
  if [ "$gpus" -lt 2 ]; then
    sg=1
    echo "SKIPPED compute-sanitizer at G=2: it needs a GPU per rank; $gpus GPU(s) here, so G=1"
  fi
  if [ "$gpus" -ge 1 ]; then
    for tool in memcheck racecheck; do
      # T=1 and 7 take the narrow layout, 300 and the chunks of 3000 the wide one (rows
      # staged in shared memory): both layouts of the fused kernel run under the tool
      # and the fused kernel writing an FP8 KV cache (its epilogue, both layouts)
      for rope in "" --rope --kv; do
        args=$rope
        [ "$rope" = --kv ] && args="--rope --kv-cache fp8"
        echo "=== compute-sanitizer $tool, G=$sg, check --transport ipc $args, both layouts"
        CUPY_QKNORM_WIDE_FROM=300 mpirun $sg compute-sanitizer --tool $tool \
          --log-file "$LOGS/$tool$rope-G$sg-rank%q{OMPI_COMM_WORLD_RANK}.log" \
          python3 -m cupy_qknorm check --transport ipc $args --tokens 1,7,300,3000 \
          --max-tokens 1024 > "$LOGS/$tool$rope.out" 2>&1
        rc=$?
        tail -1 "$LOGS/$tool$rope.out"
        [ $rc -eq 0 ] || { echo "$tool $args FAILED (exit $rc)"; fail=1; }
        sanitizer_counts "$tool $args G=$sg" "$LOGS"/$tool$rope-G$sg-rank*.log
      done
    done
  fi
fi
if [ "${SOAK:-0}" = 1 ]; then
  if [ "$own" -ge 2 ]; then
    echo "=== G=$own: ${CYCLES:-500} construct/close cycles"
    mpirun "$own" python3 scripts/cycles.py --cycles "${CYCLES:-500}" || fail=1
    echo "=== G=$own: soak, ${SOAK_CALLS:-1000000} calls eager and in graphs"
    STAGE_TIMEOUT=${SOAK_TIMEOUT:-900} mpirun "$own" python3 scripts/soak.py \
      --calls "${SOAK_CALLS:-1000000}" || fail=1
  else
    echo "SKIPPED soak: it needs G >= 2 with a GPU per rank (largest here: G=$own)"
  fi
fi
[ "$largest" -gt 0 ] || { echo "no G could run here ($gpus GPUs): nothing was tested"; fail=1; }
[ -s "$LOGS/faults.jsonl" ] && sed 's/^/fault: /' "$LOGS/faults.jsonl"
# one file, so that a runner that fetches few files back gets every log
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-logs.tgz" -C "$LOGS" . && echo "logs: $OUT/gpu-logs.tgz"
[ $fail -eq 0 ] && echo "GPU SUITE PASSED" || echo "GPU SUITE FAILED"
exit $fail
