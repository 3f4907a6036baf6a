#!/usr/bin/env bash
# Builds probes of csrc/salience_wgmma.cu: three that split what its pipeline costs beyond the exps (#15: the
# column-sum mix alone keeps MUFU 93-96 % busy at 8-16 warps per SM, bench/exp_rate_probe.cu, the kernel 64-69 %):
#   base     the kernel as it is
#   noexp    each score's exp2 an FMUL instead (no MUFU; its FFMA and FADD stay): QK^T + barriers + issue
#   nowgmma  no QK^T wgmma (the score registers keep what they hold; fenced, so every exp stays): exps + barriers
# and runs base several times per shape: every run's checksums must be equal to the bit (a build of the kernel
# whose sums came out wrong in 3 of 45 runs at D = 128, results/h200/salience_desc_advance/, and right in the
# GPU tests, made this the cheapest guard against an ordering bug that shows only now and then).
# (Experiments measured and not adopted left this list with their patches and numbers: the 2 x 64 tiles of
# results/h200/salience_c2n64/, the cross-item S of salience_cross_item/, the last tile's valid groups of
# salience_last_groups/, the descriptor adds of salience_desc_advance/, the early resident tile of
# salience_early_resident/, one barrier per pair of tiles of salience_pair_handoff/; the LSE pass's A operand
# from registers ('rega': the sed of kRegisterA to C == 4, +3 % / +10 % at 729 tokens / 32k on the 8-tile ring,
# salience_structure/salience_structure_8d2bda8.md); bench/NOTES.md.)
# The variants are generated in a temporary directory by sed and patch (the production file is not edited).
#   bash bench/salience_structure.sh [BIN]     binaries into BIN (default .session/bin) as salience_probe_{base,...}
#   bash bench/salience_structure.sh --run OUT [BIN]  times each at QwenVL 32k, SigLIP 64 frames and 1024-token
#                                              frames into OUT/salience_structure.md; with BIN, BIN's binaries
#                                              (built here beforehand: no nvcc time on the GPU machine), else
#                                              builds in a temporary directory
# Run a binary as bench/salience_wgmma_probe.cu says, e.g. `salience_probe_nowgmma 80 32768 16 32768 10 0 4 64`;
# only base's checksums mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
run=""
prebuilt=""
if [ "${1:-}" = --run ]; then
  run="$2"
  if [ -n "${3:-}" ]; then bin="$3"; prebuilt=1; else bin=$(mktemp -d); fi
else
  bin="${1:-.session/bin}"
fi
variants=(base noexp nowgmma)
mkdir -p "$bin"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"; [ -z "$run" ] || [ -n "$prebuilt" ] || rm -rf "$bin"' EXIT
src=csrc/salience_wgmma.cu
grep -q 'ex2_pair<kPolyEvery>(' "$src" && grep -q '^ *if constexpr (kRegA)$' "$src" && grep -q '^ *kk > 0);$' "$src" || {
  echo "salience_structure.sh: $src no longer has the lines the variants rewrite" >&2; exit 1; }
for v in "${variants[@]}"; do mkdir -p "$tmp/$v"; done
cp "$src" "$tmp/base/salience_wgmma.cu"
sed -e '/^using sparsevila::ex2_pair;/a __device__ __forceinline__ float probe_no_exp(float x, int) { return x * 1.0001f; }' \
    -e 's/ex2_pair<kPolyEvery>(/probe_no_exp(/g' "$src" > "$tmp/noexp/salience_wgmma.cu"
sed -e '/^ *if constexpr (kRegA)$/,/^ *kk > 0);$/c\      ;  // probe: no QK^T (the k-step loop stays, empty)' "$src" \
  > "$tmp/nowgmma/salience_wgmma.cu"
if [ -z "$prebuilt" ]; then
  pids=()
  for v in "${variants[@]}"; do
    nvcc -O3 -std=c++17 --use_fast_math -lineinfo -gencode arch=compute_90a,code=sm_90a -Icsrc \
      -DSRC="\"$tmp/$v/salience_wgmma.cu\"" bench/salience_wgmma_probe.cu -o "$bin/salience_probe_$v" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed build stops here
fi
if [ -z "$run" ]; then ls -la "$bin"/salience_probe_*; exit 0; fi
rc=0
: > "$run/salience_structure.md"
shapes=("80 32768 16 32768 10" "72 46656 16 729 30" "80 65536 16 1024 10")  # QwenVL 32k, SigLIP 64 frames, 1024
probe() {  # probe VARIANT "C N" TAG [quiet]: per shape a timing line into the table (unless quiet), checksums kept
  local v="$1" tiles="$2" tag="$3" quiet="${4:-}" shape out
  for shape in "${shapes[@]}"; do
    # shellcheck disable=SC2086 # the shape is five arguments, the tiles two
    out=$("$bin/salience_probe_$v" $shape 0 $tiles) || rc=1
    [ -n "$quiet" ] || echo "$v: $(grep -m1 '^D=' <<< "$out")" | tee -a "$run/salience_structure.md"
    grep '^check:\|^lse check:' <<< "$out" > "$tmp/check_${tag}_${shape// /_}" || true  # failed: rc is 1 already
  done
}
same() {  # same TAG BASE_TAG: both passes' checksums equal to the bit at every shape
  local shape
  for shape in "${shapes[@]}"; do
    if ! cmp -s "$tmp/check_$2_${shape// /_}" "$tmp/check_$1_${shape// /_}"; then
      echo "$1: sums differ from $2 at $shape: $(tr '\n' ' ' < "$tmp/check_$1_${shape// /_}")" \
        | tee -a "$run/salience_structure.md"
      rc=1
    fi
  done
}
probe base "4 64" base_4x64; probe base "2 128" base_2x128; probe noexp "4 64" noexp; probe nowgmma "4 64" nowgmma
# base again, 8 runs per shape and tile shape (D 128 too, where the wrong sums showed): the same bits every run
shapes+=("128 32768 16 1024 2")
for tiles in "4 64" "2 128"; do
  for rep in 1 2 3 4 5 6 7 8; do probe base "$tiles" "rep${rep}_${tiles// /x}" quiet; done
  for rep in 2 3 4 5 6 7 8; do same "rep${rep}_${tiles// /x}" "rep1_${tiles// /x}"; done
done
echo "base: $((${#shapes[@]} * 16)) repeated runs compared" | tee -a "$run/salience_structure.md"
exit $rc
