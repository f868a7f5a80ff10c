#!/usr/bin/env bash
# A/B of the fused kernel's tuning knobs (cupy_qknorm/knobs.py) in one GPU-host call,
# from the repository root:
#     bash scripts/bench_variants.sh G TOKENS VARIANT...
#     bash scripts/bench_variants.sh 2 1,64,512,1024 "" CUPY_QKNORM_VECTORS_PER_THREAD=1 ""
# Each VARIANT is a space-separated list of VAR=VALUE ("" = the defaults; list it twice to
# see the run-to-run spread). Runs `bench --mode graph --transports ipc` once per variant
# and prints only the table rows, each tagged with its variant, so that a long sweep still
# fits the end of a captured output. Each run's log and JSON go to ${BENCH_OUT:-bench-variants}/
# and, when $OUT is set, as one archive to $OUT/bench-variants.tgz. $BENCH_ARGS is added
# to every bench command (e.g. BENCH_ARGS=--in-place).
set -u
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,11p "$0"; exit 2; }
g=$1 tokens=$2
shift 2
out=${BENCH_OUT:-bench-variants}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=(mpiexec)  # Open MPI needs these flags as root on the GPU hosts; MPICH rejects them
mpiexec --version 2>&1 | grep -q "Open MPI" && mpi+=(--allow-run-as-root --bind-to none)
fail=0 i=0
for v in "$@"; do
  i=$((i + 1))
  label=${v:-default}
  # shellcheck disable=SC2086 # the variant and BENCH_ARGS are lists, split on purpose
  timeout "${VARIANT_TIMEOUT:-120}" env $v "${mpi[@]}" -n "$g" \
    python3 -m cupy_qknorm bench --mode graph --transports ipc --tokens "$tokens" \
    --json "$out/variant$i.json" ${BENCH_ARGS:-} > "$out/variant$i.log" 2>&1
  rc=$?
  grep -E "^NVIDIA|^fused kernel|^floors" "$out/variant$i.log" | head -3 | sed "s/^/[$i $label] /"
  grep -E "^ +[0-9]+ \|" "$out/variant$i.log" | sed "s/^/[$i $label] /"
  [ $rc -eq 0 ] || { echo "[$i $label] FAILED (exit $rc): see $out/variant$i.log"; fail=1; }
done
[ -n "${OUT:-}" ] && tar czf "$OUT/bench-variants.tgz" -C "$out" . && echo "logs: $OUT/bench-variants.tgz"
exit $fail
