#!/usr/bin/env bash
# Builds four probes of csrc/salience_wgmma.cu: three that split what its pipeline costs beyond the exps (#15: the
# column-sum mix alone keeps MUFU 93-96 % busy at 8-16 warps per SM, bench/exp_rate_probe.cu, the kernel 64-69 %):
#   base     the kernel as it is
#   noexp    each score's exp2 an FMUL instead (no MUFU; its FFMA and FADD stay): QK^T + barriers + issue
#   nowgmma  no QK^T wgmma (the score registers keep what they hold; fenced, so every exp stays): exps + barriers
#   c2n64    results/h200/salience_c2n64/c2n64_experiment.patch applied: a 2 x 64 tile shape with two CTAs per SM,
#            run at 2 x 64 (the others at 4 x 64); its column sums must equal base's (same order of every sum)
# The variants are generated in a temporary directory by sed and patch (the production file is not edited).
#   bash bench/salience_structure.sh [BIN]     binaries into BIN (default .session/bin) as salience_probe_{base,...}
#   bash bench/salience_structure.sh --run OUT builds in a temporary directory, times each at QwenVL 32k, SigLIP
#                                              64 frames and 1024-token frames into OUT/salience_structure.md
# Run a binary as bench/salience_wgmma_probe.cu says, e.g. `salience_probe_nowgmma 80 32768 16 32768 10 0 4 64`;
# only base's and c2n64's column-sum checks mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
run=""
if [ "${1:-}" = --run ]; then run="$2"; bin=$(mktemp -d); else bin="${1:-.session/bin}"; fi
mkdir -p "$bin"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"; [ -z "$run" ] || rm -rf "$bin"' EXIT
src=csrc/salience_wgmma.cu
grep -q 'ex2_pair<kPolyEvery>(' "$src" && grep -q 'Wgmma64xN<T, N>::run(S' "$src" || {
  echo "salience_structure.sh: $src no longer has the lines the variants rewrite" >&2; exit 1; }
mkdir -p "$tmp/base" "$tmp/noexp" "$tmp/nowgmma" "$tmp/c2n64"
cp "$src" "$tmp/base/salience_wgmma.cu"
patch -s -o "$tmp/c2n64/salience_wgmma.cu" "$src" < bench/results/h200/salience_c2n64/c2n64_experiment.patch
sed -e '/^using sparsevila::ex2_pair;/a __device__ __forceinline__ float probe_no_exp(float x, int) { return x * 1.0001f; }' \
    -e 's/ex2_pair<kPolyEvery>(/probe_no_exp(/g' "$src" > "$tmp/noexp/salience_wgmma.cu"
sed -e '/Wgmma64xN<T, N>::run(S/,/kk > 0);/c\      ;  // probe: no QK^T (the k-step loop stays, empty)' "$src" > "$tmp/nowgmma/salience_wgmma.cu"
pids=()
for v in base noexp nowgmma c2n64; do
  nvcc -O3 -std=c++17 --use_fast_math -lineinfo -gencode arch=compute_90a,code=sm_90a -Icsrc \
    -DSRC="\"$tmp/$v/salience_wgmma.cu\"" bench/salience_wgmma_probe.cu -o "$bin/salience_probe_$v" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed build stops here
if [ -z "$run" ]; then ls -la "$bin"/salience_probe_*; exit 0; fi
rc=0
: > "$run/salience_structure.md"
shapes=("80 32768 16 32768 10" "72 46656 16 729 30" "80 65536 16 1024 10")  # QwenVL 32k, SigLIP 64 frames, 1024
for v in base noexp nowgmma c2n64; do
  tiles="4 64"; [ "$v" = c2n64 ] && tiles="2 64"
  for shape in "${shapes[@]}"; do
    # shellcheck disable=SC2086 # the shape is five arguments, the tiles two
    out=$("$bin/salience_probe_$v" $shape 0 $tiles) || rc=1
    echo "$v: $(grep -m1 '^D=' <<< "$out")" | tee -a "$run/salience_structure.md"  # the timing line
    grep -m1 '^check:' <<< "$out" > "$tmp/check_${v}_${shape// /_}" || true  # a failed probe: rc is 1 already
  done
done
for shape in "${shapes[@]}"; do
  if ! cmp -s "$tmp/check_base_${shape// /_}" "$tmp/check_c2n64_${shape// /_}"; then
    echo "c2n64: column sums differ from base at $shape: $(cat "$tmp/check_c2n64_${shape// /_}")" \
      | tee -a "$run/salience_structure.md"
    rc=1
  fi
done
exit $rc
