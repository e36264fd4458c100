#!/usr/bin/env bash
# One GPU session in one command (about 13 minutes at most): the cupy backend's tests, its
# conformance table, the GPU benchmarks, and the NCCL transport with parallel inference, every
# stage time-boxed and independent of the others (a failing or hanging stage is logged and the
# next one runs). Installs nothing.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh           # on a machine with an NVIDIA GPU
#   OUT=/tmp/smoke bash benchmarks/gpu_session.sh --smoke     # anywhere: the flow on the CPU
#
# Writes five files to $OUT (default: a new temporary folder, printed at the end):
#   session.log       everything every stage printed, with its exit status and duration
#   pytest.txt        python -m pytest -rA tests/test_backend_cupy.py (all failures, no -x)
#   conformance.json  python cli.py conformance --backend cupy --json
#   bench_gpu.md      the benchmark report (GPU named, targets of issue 6)
#   results.json      the benchmark stages' raw JSON results
#   pytest_nccl.txt   python -m pytest -rA tests/test_nccl.py (one GPU: a 1-rank NCCL communicator;
#                     two GPUs and mpiexec: mpiexec -n 2 infer --backend cupy --parallel tp=2 on NCCL)
#   parallel_gpu.md   benchmarks/parallel_cpu.py --gpu: GPT-2-small decode/prefill on one GPU against
#                     mpiexec -n 2 tp=2 and pp=2 (NCCL with a GPU per rank, else MPI through the host)
# Stage limits (seconds) can be changed with LIMIT_PYTEST, LIMIT_CONFORMANCE, LIMIT_GPT2,
# LIMIT_LLAMA, LIMIT_QUANT, LIMIT_NCCL, LIMIT_PARALLEL (0 skips a stage of these two).
set -u
cd "$(dirname "$0")/.." || exit 2
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
LOG="$OUT/session.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
: > "$LOG"
T0=$(date +%s)

stage() {  # stage NAME LIMIT COMMAND...: run under timeout, log output, exit status and duration
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== [$name] limit ${limit}s: $*" >> "$LOG"
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "=== [$name] TIMED OUT after ${limit}s" >> "$LOG"
  echo "=== [$name] exit $rc after $(( $(date +%s) - start ))s (session $(( $(date +%s) - T0 ))s)" >> "$LOG"
  echo "$name exit $rc" >> "$WORK/status"
}

stage machine 30 sh -c 'nvidia-smi || echo "no nvidia-smi"; python -c "import json; from minitx import machine; print(json.dumps(machine.info(), indent=1))"'
stage pytest "${LIMIT_PYTEST:-150}" sh -c "python -m pytest -rA -p no:cacheprovider tests/test_backend_cupy.py > '$OUT/pytest.txt' 2>&1; rc=\$?; tail -40 '$OUT/pytest.txt'; exit \$rc"
stage conformance "${LIMIT_CONFORMANCE:-60}" sh -c "python cli.py conformance --backend cupy --json > '$OUT/conformance.json'"
stage gpt2 "${LIMIT_GPT2:-90}" python benchmarks/gpu_decode.py gpt2 --work "$WORK" $SMOKE
stage llama "${LIMIT_LLAMA:-150}" python benchmarks/gpu_decode.py llama --work "$WORK" $SMOKE
stage quant "${LIMIT_QUANT:-60}" python benchmarks/gpu_decode.py quant --work "$WORK" $SMOKE
stage report 30 python benchmarks/gpu_decode.py report --work "$WORK" --out "$OUT/bench_gpu.md" $SMOKE
if [ "${LIMIT_NCCL:-90}" != 0 ]; then
  stage nccl "${LIMIT_NCCL:-90}" sh -c "python -m pytest -rA -p no:cacheprovider tests/test_nccl.py > '$OUT/pytest_nccl.txt' 2>&1; rc=\$?; tail -15 '$OUT/pytest_nccl.txt'; exit \$rc"
fi
PAR="--rounds 2 --steps 16"
if [ -n "$SMOKE" ]; then PAR="--backend numpy --layers 2 --rounds 1 --steps 2"; fi
if [ "${LIMIT_PARALLEL:-150}" != 0 ]; then
  stage parallel "${LIMIT_PARALLEL:-150}" python benchmarks/parallel_cpu.py --gpu $PAR --out "$OUT/parallel_gpu.md"
fi
python - "$WORK" "$OUT/results.json" <<'EOF' >> "$LOG" 2>&1
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
res = {}
for p in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        res[os.path.basename(p)[:-5]] = json.load(open(p))
    except (OSError, ValueError) as e:
        res[os.path.basename(p)[:-5]] = {"unreadable": str(e)}
res["status"] = open(os.path.join(work, "status")).read().splitlines()
json.dump(res, open(out, "w"), indent=1)
EOF
echo "=== session done in $(( $(date +%s) - T0 ))s" >> "$LOG"
cat "$WORK/status"
echo "results in $OUT"
rm -rf "$WORK"
