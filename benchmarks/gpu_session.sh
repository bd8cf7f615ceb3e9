#!/usr/bin/env bash
# One call on the lent GPU: tests and benchmarks, JSON and logs into $OUT. Run a list of parts, in order:
#   bash benchmarks/gpu_session.sh decode gen64 suite
# or a session's mode (the aliases at the bottom: the commands BENCHMARKS.md cites). Each part has its own
# time limit; SUITE_S bounds the suite (default: what is left of a 585 s call).
# -vv: pyproject's addopts has -q, so -v alone prints no line per test.
set -o pipefail
export PYTHONUNBUFFERED=1 ARVGQ_NO_PROGRESS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
P="canonicalize,observe{histograms=false},stwq,weight-quant,insert-qdq"
FP16_INT8=torch-fp16-graphs,cuda-int8

bench() {  # NAME SECONDS ARGS...: tools.bench with the override pipeline, JSON and log as $OUT/NAME.*
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m tools.bench --pipeline "$P" --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  grep -A6 "^workload" "$OUT/$name.log" | grep -v "^---" | cut -c1-180; grep -i "error" "$OUT/$name.log" | tail -3 || true
}

tests() {  # NAME SECONDS FILES...: pytest, one line per test in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m pytest -vv -p no:cacheprovider -n 12 -rfs -W ignore::Warning "$@" > "$OUT/$name.log" 2>&1
  grep -E "FAILED|ERROR" "$OUT/$name.log" | cut -c1-300 | tail -20; grep -E "passed|failed" "$OUT/$name.log" | tail -2
}

part() {
  case "$1" in
    suite) tests pytest "${SUITE_S:-$((585 - SECONDS))}" -n 16 --durations=20 ;;  # every test, a worker a core
    backend_tests) tests pytest_gpu 150 tests/test_cuda_kernels.py tests/test_cuda_lower.py tests/test_cuda_target.py \
      tests/test_kv_cache.py tests/test_sampling.py ;;
    gputests) tests pytest_gpu "${SUITE_S:-230}" tests/test_cuda_kernels.py tests/test_cuda_lower.py \
      tests/test_cuda_target.py tests/test_device.py tests/test_frontend_infinity.py tests/test_brecq.py \
      tests/test_generate.py tests/test_generate_edit.py tests/test_frontend_mar.py tests/test_mar_tools.py \
      tests/test_torch_int8.py tests/test_kv_cache.py tests/test_sampling.py ;;  # every file with GPU-gated tests
      # (test_bench.py's: part nvml) and the generation tests that use the GPU
    agreement) timeout 360 env TRITON_PRINT_AUTOTUNING=1 python -m pytest -vv -s -p no:xdist -p no:cacheprovider \
      --durations=5 -W ignore::Warning tests/test_cuda_lower.py -k gpu_generation_agrees 2>&1 | while IFS= read -r l; do \
      echo "$SECONDS $l"; done > "$OUT/pytest_agreement.log"; grep -cE "Triton autotuning" "$OUT/pytest_agreement.log"
      grep -E "token agreement|passed|failed|skipped|Error" "$OUT/pytest_agreement.log" | tail -4 ;;  # the suite's slowest
      # tests (the MNIST VAR's token agreement, float and int8 caches) one after the other, each line with the
      # call's second and every autotuning printed: a suite call of 450 s and a call of 200 s for them alone left
      # them unfinished in the seventh session of 2026-12-07
    kernel_tests) tests pytest_kernels 170 tests/test_cuda_kernels.py tests/test_cuda_lower.py tests/test_wgmma.py \
      tests/test_kv_cache.py ;;  # the files that test the kernels and the lowering (no whole-suite time left)
    compile_once) tests pytest_compile_once 90 tests/test_cuda_kernels.py -k compile_once ;;  # no tile compiled
      # again for a new token or key count (the seventh session of 2026-12-07's new GPU test)
    nvml) tests nvml_test 90 tests/test_bench.py -k "nvml or energy or power or clock" ;;  # the meter on the GPU
    smoke) python -m tools.bench --model var-tiny --batch 4 --pipeline "$P" --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-eager,cuda-fp8 2>&1 | tail -12 ;;  # the runners, seconds
    step64) bench var_d16_last 240 --model var-d16 --batch 64 --repeats 15 --warmup 3 --profile --backends $FP16_INT8 ;;
    step64both) bench var_d16_last_both 300 --model var-d16 --batch 64 --repeats 20 --warmup 5 --profile \
      --order interleaved,blocked --backends $FP16_INT8 ;;  # both orders on the same compiled backends
    step64blocked) bench var_d16_last_blocked 200 --model var-d16 --batch 64 --repeats 30 --warmup 5 --order blocked \
      --backends $FP16_INT8 ;;  # each backend in its own block: its own clock at the power cap
    step64ab) bench var_d16_last 220 --model var-d16 --batch 64 --repeats 15 --warmup 3 --profile \
      --backends $FP16_INT8,cuda-int8-unfused-qkv ;;  # the qkv epilogue's A/B
    step64attn) bench var_d16_last_attn 300 --model var-d16 --batch 64 --repeats 20 --warmup 5 --profile \
      --order interleaved,blocked --backends $FP16_INT8,cuda-int8-sdpa,cuda-int8-eager ;;  # attention writing codes: the A/B
    step64res) bench var_d16_last_res 300 --model var-d16 --batch 64 --repeats 20 --warmup 5 --profile \
      --order interleaved,blocked --backends $FP16_INT8,cuda-int8-norm-residual ;;  # the residual add's A/B
    step64fp8) bench var_d16_last 170 --model var-d16 --batch 64 --repeats 15 --warmup 3 --profile \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 ;;
    step16_100) bench var_d16_last_b16_b100 240 --model var-d16 --batch 16,100 --repeats 15 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 ;;
    step100) bench var_d16_last_b100 330 --model var-d16 --batch 100 --repeats 15 --warmup 3 --profile \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 ;;  # batch 100 alone: step16_100 outran its limit on a fresh machine
    decode) bench gpt_b_decode 80 --model gpt-b-decode --batch 64 --repeats 20 --warmup 3 --profile --backends $FP16_INT8 ;;
    decode_kv8) bench gpt_b_decode 80 --model gpt-b-decode --batch 64 --repeats 20 --warmup 3 --profile \
      --backends $FP16_INT8,cuda-int8-kv8 ;;
    gen_gptb) bench gpt_b_all_b64 240 --model gpt-b-decode --steps all --batch 64 --repeats 3 --warmup 1 \
      --backends $FP16_INT8 ;;  # a whole GPT-B generation: 256 decode steps, no host sync between them
    gen16) bench var_d16_all 300 --model var-d16 --steps all --batch 16 --repeats 5 --warmup 2 --backends $FP16_INT8 ;;
    gen100) bench var_d16_all_b100 300 --model var-d16 --steps all --batch 100 --repeats 4 --warmup 2 \
      --backends $FP16_INT8 ;;
    gen16_100) bench var_d16_all_b16_b100 330 --model var-d16 --steps all --batch 16,100 --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 ;;  # the whole generation at the issue's other batches, FP8 too
    gen64) bench var_d16_all_b64 300 --model var-d16 --steps all --batch 64 --repeats 5 --warmup 2 --profile \
      --backends $FP16_INT8 ;;
    gen64_all) bench var_d16_all_b64_all 330 --model var-d16 --steps all --batch 64 --repeats 3 --warmup 1 \
      --backends $FP16_INT8,cuda-fp8,cuda-int8-kv8 ;;  # the whole generation in FP8 and with int8 KV caches too
    attention) timeout 240 python benchmarks/attention_bench.py --json "$OUT/attention.json" 2>&1 | tail -20 ;;
    gemms) timeout 90 python benchmarks/gemm_bench.py --json "$OUT/gemm.json" 2>&1 | tail -25 ;;
    inflight) timeout 300 python benchmarks/qgemm_sweep.py --tiles in-flight --dtypes int8,fp8 \
      --json "$OUT/qgemm_inflight.json" 2>&1 | grep -v "^precompiled" | tail -60 ;;  # int8 MMAs in flight: the A/B
    sweep_res) timeout "$((585 - SECONDS < 300 ? 585 - SECONDS : 300))" python benchmarks/qgemm_sweep.py --dtypes int8 \
      --shapes proj,fc2,proj+res,fc2+res --json "$OUT/qgemm_sweep_res.json" 2>&1 | tail -40 ;;  # what the residual add costs proj and fc2, every tile
    tiles) python -c "import json; from backends.cuda import kernels; json.dump(kernels.autotune_cache(), \
      open('$OUT/tiles.json', 'w'), indent=1)" && echo "tiles: $(grep -c '\"key\"' "$OUT/tiles.json") tuned shapes" ;;  # every tuning of this machine
    attention_tests) tests pytest_attention 100 tests/test_cuda_kernels.py -k attention ;;
    inflight_tests) tests pytest_inflight 150 tests/test_cuda_kernels.py tests/test_wgmma.py ;;
    *) echo "unknown part: $1" >&2; exit 2 ;;
  esac
}

# Earlier sessions' modes, as parts (BENCHMARKS.md cites them).
case "$1" in
  next) set -- nvml step64blocked gen64_all ;;  # what the second session of 2026-12-07 left unrun on a GPU
  attn) set -- attention step64attn nvml ;;  # the third session of 2026-12-07: attention writing the codes
  mma) set -- inflight inflight_tests gemms ;;  # the fourth session of 2026-12-07: int8 MMAs kept in flight
  issue1) set -- gemms step64both decode tiles ;;  # issue #16's tables on a new GPU (an H200), in three calls: 1 of 3
  issue2) set -- gen64_all step16_100 ;;  # 2 of 3 (the parts' limits sum to 570 s)
  issue3) set -- gen16 gen100 ;;  # 3 of 3; then SUITE_S=450 ... suite
  issue23) set -- step16_100 gen16_100 ;;  # issue2 and issue3 less gen64_all, in one call (the fifth session of 2026-12-07)
  residual) set -- step64res gemms ;;  # the sixth session of 2026-12-07: the residual add in the GEMM epilogues
  residual2) set -- sweep_res tiles ;;  # what it left unrun: the add's cost a GEMM (after SUITE_S=450 ... suite)
  residual3) set -- agreement decode sweep_res ;;  # the seventh session of 2026-12-07, after its suite call
  agree) set -- compile_once agreement ;;  # what it left unrun: its new GPU test, the agreement tests alone (then
    # SUITE_S=450 ... suite)
  agree2) set -- decode kernel_tests ;;  # the eighth session of 2026-12-07 after its ONE_TOKEN change, with too
    # little GPU time left for the whole suite
  all) set -- smoke step64fp8 suite gemms ;;
  final) set -- suite decode gen16 ;;
  measure|step|step2|final2) set -- step64fp8 step16_100 backend_tests ;;
  step3) set -- smoke step64fp8 gen16 decode step16_100 ;;
  final3) set -- step64 decode_kv8 suite ;;
  final4|s4base) set -- step64 decode gen16 ;;
  kv8|kv8final|kvcheck) set -- backend_tests step64 decode_kv8 attention ;;
  generation) set -- gen16 decode ;;
esac
for p in "$@"; do part "$p"; done
