#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, seeded fuzzing of every op, all benchmarks, the full-size demo.
#   bash bench/gpu_check.sh [tests|bench|all] [--quick]
# Results go to $SPARSEVILA_BENCH_DIR (default $OUT/results or bench/results/<gpu>); everything is also packed
# into $OUT/results.tgz (the device tool returns at most 8 files). A short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"; quick="${2:-}"
out="${OUT:-/tmp/sparsevila_out}"; mkdir -p "$out"
export SPARSEVILA_BENCH_DIR="${SPARSEVILA_BENCH_DIR:-$out/results}"; mkdir -p "$SPARSEVILA_BENCH_DIR"
export PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1 || pip install --no-deps -e . -q
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
status=0
log="$SPARSEVILA_BENCH_DIR/gpu_check.log"
step() {  # step NAME CMD...: run, log, remember failures
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$SPARSEVILA_BENCH_DIR/summary.txt"
  [ "$rc" = 0 ] || status=1
}
if [ "$what" = tests ] || [ "$what" = all ]; then
  step gpu-tests python -m pytest -q -m gpu tests -x -p no:cacheprovider
  n=200; [ "$quick" = --quick ] && n=40
  step fuzz python -m sparsevila_ops fuzz --op all --backend triton --cases "$n" --seed 1000 --device cuda
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  q=(); [ "$quick" = --quick ] && q=(--quick)
  step figure3 python -m bench.figure3 "${q[@]}"
  step select python -m bench.select "${q[@]}"
  step decode python -m bench.decode "${q[@]}"
  step demo python -m sparsevila_ops demo --json "$SPARSEVILA_BENCH_DIR/demo.json"
fi
tar -czf "$out/results.tgz" -C "$(dirname "$SPARSEVILA_BENCH_DIR")" "$(basename "$SPARSEVILA_BENCH_DIR")" 2>/dev/null
echo; echo "==== summary ($what) ===="; cat "$SPARSEVILA_BENCH_DIR/summary.txt"
for f in "$SPARSEVILA_BENCH_DIR"/*.md; do [ -f "$f" ] && { echo "--- $(basename "$f")"; tail -n +4 "$f" | head -40; }; done
exit $status
