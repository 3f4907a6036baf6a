#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, seeded fuzzing of every op, all benchmarks, the full-size demo.
#   bash bench/gpu_check.sh [tests|gpu-tests|bench|all] [--quick]   (gpu-tests: the build and the gpu tests only)
# Env: SKIP_GPU_TESTS=1 (fuzz only), GPU_TESTS_SHARD=i/n (the i-th of n slices of the gpu tests: the full
# suite takes ~15 min on an H200 in one process, more than one 600 s device call), GPU_TESTS_WORKERS=n (the gpu
# tests in n processes sharing the GPU, through pytest-xdist: bench/wheels.sh builds its wheels into .whl/ for the
# offline image; most of the suite's time is Triton compiles on the CPU), FUZZ_OPS="op ..." (default: every op),
# GIT_COMMIT (stamped on results).
# Results go to $SPARSEVILA_BENCH_DIR (default $OUT/results or bench/results/<gpu>); everything is also packed
# into $OUT/results.tgz (the device tool returns at most 8 files). A short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"; quick="${2:-}"
case "$what" in tests|gpu-tests|bench|all) ;; *) echo "gpu_check: unknown part '$what'" \
  "(tests, gpu-tests, bench or all)" >&2; exit 2 ;; esac
out="${OUT:-/tmp/sparsevila_out}"; mkdir -p "$out"
export SPARSEVILA_BENCH_DIR="${SPARSEVILA_BENCH_DIR:-$out/results}"; mkdir -p "$SPARSEVILA_BENCH_DIR"
export PYTHONUNBUFFERED=1
# The image is offline: install this checkout editable with the setuptools already there (pyproject.toml,
# PEP 660), and stop if that fails or the installed package is not this checkout: never run from the source tree.
if ! python -m pip install --no-deps --no-build-isolation -e . -q > "$out/pip_install.log" 2>&1; then
  cat "$out/pip_install.log" >&2
  echo "gpu_check: FAILED to install sparsevila_ops: 'pip install --no-deps --no-build-isolation -e .' (log above," \
       "$out/pip_install.log). Offline it needs setuptools>=70.1 installed (python -m pip show setuptools)." >&2
  exit 2
fi
# Packages the offline image lacks, built here by bench/wheels.sh and carried as .whl (gemlite for bench.gemv4)
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
root="$PWD"
if ! (cd / && python -c "import os, sys, sparsevila_ops.triton_kernels, sparsevila_ops.csrc as c
pkg = os.path.dirname(os.path.dirname(os.path.abspath(sparsevila_ops.__file__)))
sys.exit(0 if os.path.samefile(pkg, sys.argv[1]) and os.path.samefile(os.path.dirname(c.__file__), os.path.join(sys.argv[1], 'csrc')) else
         'installed sparsevila_ops is ' + sparsevila_ops.__file__ + ', not this checkout')" "$root"); then
  echo "gpu_check: FAILED: the installed sparsevila_ops does not import from this checkout ($root) outside it" >&2
  exit 2
fi
workers=()  # GPU_TESTS_WORKERS: checked before the build and the tests run
if [ -n "${GPU_TESTS_WORKERS:-}" ]; then
  [[ "$GPU_TESTS_WORKERS" =~ ^[1-9][0-9]*$ ]] \
    || { echo "gpu_check: GPU_TESTS_WORKERS must be a positive integer; got '$GPU_TESTS_WORKERS'" >&2; exit 2; }
  python -c "import xdist" 2>/dev/null || { echo "gpu_check: GPU_TESTS_WORKERS needs pytest-xdist (offline:" \
    "bash bench/wheels.sh where PyPI is reachable, then carry .whl)" >&2; exit 2; }
  workers=(-n "$GPU_TESTS_WORKERS")
fi
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
if [ "$what" = tests ] || [ "$what" = gpu-tests ] || [ "$what" = all ]; then
  step warmup python -m sparsevila_ops warmup  # the cuda backend's build, timed on its own (cached after)
  if [ -z "${SKIP_GPU_TESTS:-}" ]; then
    gpu_pytest() {  # gpu_pytest ARGS...: the gpu tests among ARGS; with workers, the `serial` ones after them
      local rc
      if [ "${#workers[@]}" = 0 ]; then python -m pytest -q -rf -x -p no:cacheprovider -m gpu "$@"; return; fi
      python -m pytest -q -rf -x -p no:cacheprovider "${workers[@]}" -m "gpu and not serial" "$@"; rc=$?
      [ "$rc" = 0 ] || [ "$rc" = 5 ] || return "$rc"  # 5: none selected
      python -m pytest -q -rf -x -p no:cacheprovider -m "gpu and serial" "$@"; rc=$?
      [ "$rc" = 5 ] && rc=0
      return "$rc"
    }
    if [ -n "${GPU_TESTS_SHARD:-}" ]; then  # i/n: the i-th of n contiguous slices of the collected gpu tests
      gpu_tests_shard() {
        local i="${GPU_TESTS_SHARD%/*}" n="${GPU_TESTS_SHARD#*/}" ids total lo hi sel
        [[ "$i" =~ ^[0-9]+$ && "$n" =~ ^[0-9]+$ && "$i" -ge 1 && "$i" -le "$n" ]] \
          || { echo "gpu_check: GPU_TESTS_SHARD must be i/n with 1 <= i <= n; got '$GPU_TESTS_SHARD'" >&2; return 2; }
        ids="$(python -m pytest --co -q -m gpu tests -p no:cacheprovider | grep '::')" || return 2
        total=$(printf '%s\n' "$ids" | wc -l); lo=$(( (i - 1) * total / n + 1 )); hi=$(( i * total / n ))
        echo "gpu tests $lo..$hi of $total"
        mapfile -t sel < <(printf '%s\n' "$ids" | sed -n "${lo},${hi}p")  # one argument per id, no globbing
        [ "${#sel[@]}" -gt 0 ] || { echo "gpu tests: this slice is empty"; return 0; }  # (pytest alone: every test)
        gpu_pytest "${sel[@]}"
      }
      step gpu-tests gpu_tests_shard
    else
      step gpu-tests gpu_pytest tests
    fi
  fi
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  n=200; [ "$quick" = --quick ] && n=40
  # One process per op: real-size cases are bound by Triton JIT compiles (CPU), which run in parallel.
  ops="${FUZZ_OPS:-$(python -c 'from sparsevila_ops.fuzz import GENERATORS; print(" ".join(sorted(GENERATORS)))')}"
  fuzz_all() {
    local pids=() rc=0
    for op in $ops; do
      python -m sparsevila_ops fuzz --op "$op" --backend triton --cases "$n" --seed 1000 --device cuda \
        > "$SPARSEVILA_BENCH_DIR/fuzz_$op.log" 2>&1 & pids+=($!)
    done
    if [ -z "${FUZZ_OPS:-}" ]; then  # the cuda backend's ops (visual_salience's default backend is cuda on sm_90)
      for op in decode_attention gemv visual_salience w4a16_linear; do
        python -m sparsevila_ops fuzz --op "$op" --backend cuda --cases "$n" --seed 1000 --device cuda \
          > "$SPARSEVILA_BENCH_DIR/fuzz_${op}_cuda.log" 2>&1 & pids+=($!)
      done
    fi
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    cat "$SPARSEVILA_BENCH_DIR"/fuzz_*.log
    return $rc
  }
  step fuzz fuzz_all
  # compute-sanitizer on one launch of every salience and gemv instantiation (checked against the reference too);
  # racecheck, minutes at the salience inputs' 48 repeats, runs them once (one work item per persistent CTA), and
  # the standalone probe with 1024 items (several per CTA: both resident buffers reused) in both tile shapes
  for tool in memcheck racecheck synccheck; do
    r=(); [ "$tool" = racecheck ] && r=(--repeat 1)
    step "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python -m bench.sanitize_salience "${r[@]}"
    step "sanitize-gemv-$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 python -m bench.sanitize_gemv
  done
  step sanitize-racecheck-items bash -c 'set -e; d=$(mktemp -d)
    nvcc -O3 -std=c++17 --use_fast_math -gencode arch=compute_90a,code=sm_90a \
    -Icsrc -DSRC="\"salience_wgmma.cu\"" bench/salience_wgmma_probe.cu -o "$d/salience_probe"
    for tiles in "4 64" "2 128"; do  # D 80, 256 segments of 100 tokens, 4 heads, one timed launch per pass
      compute-sanitizer --tool racecheck --error-exitcode 3 "$d/salience_probe" 80 25600 4 100 1 0 $tiles; done'
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  q=(); [ "$quick" = --quick ] && q=(--quick)
  step figure3 python -m bench.figure3 "${q[@]}"
  step salience_sweep python -m bench.figure3_salience --sweep "${q[@]}"  # every config of both Triton passes
  # the exp2 rate of the salience column sums' arithmetic alone (standalone CUDA, no package build)
  step exp_rate_probe bash -c 'set -o pipefail; nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a \
    bench/exp_rate_probe.cu -o "$0/exp_rate_probe" && "$0/exp_rate_probe" | tee "$0/exp_rate_probe.md"' \
    "$SPARSEVILA_BENCH_DIR"
  # the wgmma salience kernel with its exps or its QK^T removed (what the pipeline costs beyond the exps), at 4 x 64
  # and 2 x 128 tiles, QwenVL 32k, SigLIP 64 frames and 1024-token frames; base run 8 times per shape (bit-equal)
  step salience_structure bash bench/salience_structure.sh --run "$SPARSEVILA_BENCH_DIR"
  # the one-exp fused salience experiment (bench/salience_fused.cu) against the wgmma kernel's two passes
  step salience_fused_probe bash -c 'set -o pipefail; nvcc -O3 -std=c++17 --use_fast_math -lineinfo \
    -gencode arch=compute_90a,code=sm_90a -Icsrc bench/salience_fused_probe.cu bench/salience_fused.cu \
    csrc/salience_wgmma.cu -o "$0/salience_fused_probe" && for s in "72 46656 16 729" "80 46848 16 768" \
    "80 46592 16 256"; do "$0/salience_fused_probe" $s; done | tee "$0/salience_fused_probe.md"' "$SPARSEVILA_BENCH_DIR"
  step select python -m bench.select "${q[@]}"
  step decode python -m bench.decode "${q[@]}"
  step rope_append python -m bench.rope_append
  step demo python -m sparsevila_ops demo --json "$SPARSEVILA_BENCH_DIR/demo.json"
  step qwen2_5_vl python -m sparsevila_ops demo --model qwen2_5_vl --json "$SPARSEVILA_BENCH_DIR/qwen2_5_vl_demo.json"
  step llava_onevision python -m sparsevila_ops demo --model llava_onevision \
    --json "$SPARSEVILA_BENCH_DIR/llava_onevision_demo.json"
  step qwen2_5_vl_graph_check python -m bench.integration_graph_check --dtype bfloat16
  step qwen2_5_vl_memory_check python -m bench.integration_memory_check
  step pdl_check python -m bench.pdl_check  # inductor's PDL in the compiled decode step: every kernel waits
  step gemv4 python -m bench.gemv4 "${q[@]}"
  # the W4A16 layer against its GEMVs timed alone, three interleaved rounds at batch 1 and 2, PDL on and off
  step gemv4_rounds python -m bench.gemv4 --batches 1 2 1 2 1 2 --methods cuda --name gemv4_rounds
  step gemv4_rounds_nopdl env SPARSEVILA_PDL=0 python -m bench.gemv4 --batches 1 2 1 2 1 2 --methods cuda \
    --name gemv4_rounds_nopdl
  step gemv_folds python -m bench.gemv_folds
  step vision_block python -m bench.vision_block
  step glu_gemm python -m bench.glu_gemm  # experiment: the SiLU gate in the gate/up GEMM epilogue vs cuBLAS
  step tower_window python -m bench.tower_window  # window_attention on the 7B tower's own arguments vs alone
  step siglip_tower python -m bench.siglip_tower  # LLaVA-OneVision's SigLIP layer and pooling: stock vs ours
  step mrope_positions python -m bench.mrope_positions  # the prompt's mRoPE positions: transformers' loop vs ours
  step e2e python -m bench.e2e "${q[@]}"
  step e2e_llava_onevision python -m bench.e2e --model llava_onevision "${q[@]}"
  step decode_host python -m bench.decode_host  # host ms per decode step by Python function (4-bit, 0.75 / 0.95)
  step decode_host_step_graph python -m bench.decode_host --step-graph  # the same replayed from our own graphs
  step autotune python -m bench.autotune "${q[@]}"
fi
tar -czf "$out/results.tgz" -C "$(dirname "$SPARSEVILA_BENCH_DIR")" "$(basename "$SPARSEVILA_BENCH_DIR")" 2>/dev/null
echo; echo "==== summary ($what) ===="; cat "$SPARSEVILA_BENCH_DIR/summary.txt"
for f in "$SPARSEVILA_BENCH_DIR"/*.md; do [ -f "$f" ] && { echo "--- $(basename "$f")"; tail -n +4 "$f" | head -40; }; done
exit $status
