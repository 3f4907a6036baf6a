#!/usr/bin/env bash
# Same-machine A/B of the W4A16 GEMV (csrc/gemv4.cu) against a patch of it and of bench/gemv4_probe.cu: builds the
# probe from this checkout (A, "head") and from a scratch copy with PATCH applied (B), runs each one's correctness
# grid, then the `time` sweep twice each, A and B alternating, and writes bench.gemv4_ab's comparison.
#   bash bench/gemv4_ab.sh PATCH OUT [NAME [BIN]]  logs OUT/probe_{check,sweep}_{head,NAME}*.log, OUT/gemv4_ab_NAME.md
# NAME defaults to the patch's file name without "_experiment.patch". With BIN, the probes are BIN/gemv4_probe_head
# and BIN/gemv4_probe_NAME: used as they are when both exist (built here beforehand, carried to the GPU machine),
# else built there. Exits non-zero when a build or check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash bench/gemv4_ab.sh PATCH OUT [NAME [BIN]]" >&2; exit 2; }
patch_file="$(realpath "$1")"; out="$2"; name="${3:-$(basename "$1" _experiment.patch)}"
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
bin="${4:-$tmp}"; mkdir -p "$bin"
if [ ! -x "$bin/gemv4_probe_head" ] || [ ! -x "$bin/gemv4_probe_$name" ]; then
  for side in head "$name"; do
    mkdir -p "$tmp/$side/bench"
    cp -r csrc "$tmp/$side/"
    cp bench/gemv4_probe.cu "$tmp/$side/bench/"
  done
  (cd "$tmp/$name" && patch -s -p1 < "$patch_file")
  pids=()
  for side in head "$name"; do
    nvcc -std=c++17 -O3 -arch=sm_90a -o "$bin/gemv4_probe_$side" "$tmp/$side/bench/gemv4_probe.cu" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed build stops here
fi
for side in head "$name"; do
  "$bin/gemv4_probe_$side" > "$out/probe_check_$side.log"  # set -e: a wrong result (exit 1) stops here
  tail -1 "$out/probe_check_$side.log"
done
for r in 1 2; do
  for side in head "$name"; do "$bin/gemv4_probe_$side" time > "$out/probe_sweep_${side}_$r.log"; done
done
python -m bench.gemv4_ab "$out"/probe_sweep_head_{1,2}.log -- "$out/probe_sweep_${name}"_{1,2}.log \
  | tee "$out/gemv4_ab_$name.md"
