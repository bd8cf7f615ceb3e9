#!/usr/bin/env bash
# One call on the lent GPU: the suite there, the benchmarks (JSON and logs into $OUT). One mode per call:
#   run: bash benchmarks/gpu_session.sh MODE   (the modes below; final3/final4 are this session's last ones)
# -vv: pyproject's addopts has -q, so -v alone prints no line per test.
set -o pipefail
export PYTHONUNBUFFERED=1 ARVGQ_NO_PROGRESS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
P="canonicalize,observe{histograms=false},stwq,weight-quant,insert-qdq"
case "$1" in
  suite)  # every test, one line per test in the log (a run cut short still says what passed and failed)
    timeout ${SUITE_S:-480} python -m pytest -vv -p no:cacheprovider -n 14 -rfs --durations=20 -W ignore::Warning \
      > "$OUT/pytest.log" 2>&1
    grep -E "FAILED|ERROR" "$OUT/pytest.log" | cut -c1-300 | tail -30; grep -E "passed|failed" "$OUT/pytest.log" | tail -3 ;;
  all)  # one call when machines are scarce: smoke, the step at batch 64 and 16, the suite, the GEMM table
    bash "$0" smoke || exit 1
    timeout 300 python -m tools.bench --model var-d16 --batch 64,16 --pipeline "$P" --repeats 15 --warmup 3 --profile \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-eager,cuda-fp8 \
      --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A6 "^workload" "$OUT/var_d16_last.log" | head -30
    timeout 150 python -m pytest -q -p no:cacheprovider -n 12 -rfs > "$OUT/pytest.log" 2>&1; tail -25 "$OUT/pytest.log"
    timeout 60 python benchmarks/gemm_bench.py --json "$OUT/gemm.json" 2>&1 | tail -25 ;;
  final)  # the suite, then GPT-B decode and a whole VAR-d16 generation (fewest shapes first)
    SUITE_S=240 bash "$0" suite
    timeout 110 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A4 "^workload" "$OUT/gpt_b_decode.log"; grep -i "error" "$OUT/gpt_b_decode.log" | tail -2
    timeout 200 python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_all.json" > "$OUT/var_d16_all.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_all.log"; grep -i "error" "$OUT/var_d16_all.log" | tail -2 ;;
  gputests)  # every test file with GPU-gated tests, and the generation tests that run on the GPU by default
    timeout ${SUITE_S:-230} python -m pytest -vv -p no:cacheprovider -n 12 -rfs -W ignore::Warning \
      tests/test_cuda_kernels.py tests/test_cuda_lower.py tests/test_cuda_target.py tests/test_device.py \
      tests/test_frontend_infinity.py tests/test_brecq.py tests/test_generate.py tests/test_generate_edit.py \
      tests/test_frontend_mar.py tests/test_mar_tools.py tests/test_torch_int8.py > "$OUT/pytest_gpu.log" 2>&1
    grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | cut -c1-300 | tail -20; grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -2 ;;
  measure)  # the step at batch 64 and 16 with its profile (FP16 graphs, int8, fp8), then the GPU tests only
    timeout 380 python -m tools.bench --model var-d16 --batch 64,16 --pipeline "$P" --repeats 15 --warmup 3 --profile \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A5 "^workload\|^backend\|^---" "$OUT/var_d16_last.log" | cut -c1-160 | head -90; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 150 python -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_kernels.py tests/test_cuda_lower.py \
      tests/test_cuda_target.py tests/test_torch_int8.py tests/test_device.py > "$OUT/pytest_gpu.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed" "$OUT/pytest_gpu.log" | cut -c1-250 | tail -20 ;;
  final2)  # the suite, then the step at batch 64 and GPT-B decode: the last call of a session
    SUITE_S=${SUITE_S:-290} bash "$0" suite
    timeout 110 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_last.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 55 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A4 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-160; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3 ;;
  step3)  # smoke, the step at batch 64 (profiled), a whole generation at 16, GPT-B decode, the step at 16 and 100
    bash "$0" smoke || exit 1
    timeout 170 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --profile --backends torch-fp16-graphs,cuda-int8,cuda-fp8 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_last.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 110 python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" --repeats 5 --warmup 2 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_all.json" > "$OUT/var_d16_all.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_all.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_all.log" | tail -3
    timeout 80 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A4 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-160; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    timeout 130 python -m tools.bench --model var-d16 --batch 16,100 --pipeline "$P" --repeats 15 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8,cuda-fp8 --json "$OUT/var_d16_last_b16_b100.json" > "$OUT/var_d16_b16_b100.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_b16_b100.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_b16_b100.log" | tail -3 ;;
  final4)  # the GPU backend's tests, GPT-B decode, a whole generation at 16 (after the LlamaGen residual fix)
    timeout 100 python -m pytest -q -p no:cacheprovider -n 12 -rf tests/test_cuda_kernels.py tests/test_cuda_lower.py \
      tests/test_kv_cache.py -k "not generation_agrees" > "$OUT/pytest_gpu.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed" "$OUT/pytest_gpu.log" | cut -c1-250 | tail -12
    timeout 70 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A4 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-180; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    timeout $((380 - SECONDS)) python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" \
      --repeats 5 --warmup 2 --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_all.json" \
      > "$OUT/var_d16_all.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_all.log" | cut -c1-180; grep -i "error" "$OUT/var_d16_all.log" | tail -3 ;;
  final3)  # the step at 64 (profiled), GPT-B decode with and without int8 KV caches (profiled), then the suite
    timeout 130 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --profile --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_last.log" | cut -c1-180; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 80 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --profile --backends torch-fp16-graphs,cuda-int8,cuda-int8-kv8 --json "$OUT/gpt_b_decode.json" \
      > "$OUT/gpt_b_decode.log" 2>&1
    grep -A5 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-180; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    SUITE_S=$((585 - SECONDS)) bash "$0" suite ;;
  kvcheck)  # the int8-KV kernels on the GPU: their tests, a tiny VAR through the runner, the attention micro-benchmark
    timeout 120 python -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_kernels.py tests/test_kv_cache.py \
      tests/test_cuda_lower.py -k "(int8 or attention or kv) and not generation_agrees" > "$OUT/pytest_kvcheck.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed|Error" "$OUT/pytest_kvcheck.log" | cut -c1-250 | tail -20
    timeout 60 python -m tools.bench --model var-tiny --batch 4 --pipeline "$P" --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-kv8 2>&1 | tail -6
    timeout 120 python benchmarks/attention_bench.py --json "$OUT/attention.json" 2>&1 | tail -20 ;;
  kv8final)  # smoke of the int8 KV caches, the step at 64 and GPT-B decode (profiled), then the suite in what is left
    B3=torch-fp16-graphs,cuda-int8,cuda-int8-kv8
    timeout 60 python -m tools.bench --model var-tiny --batch 4 --pipeline "$P" --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8-kv8 > "$OUT/smoke_kv8.log" 2>&1 || { B3=torch-fp16-graphs,cuda-int8; tail -5 "$OUT/smoke_kv8.log"; }
    timeout 160 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --profile --backends $B3 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_last.log" | cut -c1-180; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 80 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --profile --backends $B3 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A5 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-180; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    SUITE_S=$((585 - SECONDS)) bash "$0" suite ;;
  kv8)  # the int8-KV GPU tests, then the step at 64 (profiled), GPT-B decode (profiled), a whole generation at 16
    timeout 150 python -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_kernels.py tests/test_kv_cache.py \
      tests/test_cuda_lower.py -k "int8 or kv or generation_agrees" > "$OUT/pytest_kv8.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed|token agreement" "$OUT/pytest_kv8.log" | cut -c1-250 | tail -20
    B3=torch-fp16-graphs,cuda-int8,cuda-int8-kv8
    timeout 150 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --profile --backends $B3 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_last.log" | cut -c1-180; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 80 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --profile --backends $B3 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A5 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-180; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    timeout 170 python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" --repeats 5 --warmup 2 \
      --backends $B3 --json "$OUT/var_d16_all.json" > "$OUT/var_d16_all.log" 2>&1
    grep -A5 "^workload" "$OUT/var_d16_all.log" | cut -c1-180; grep -i "error" "$OUT/var_d16_all.log" | tail -3 ;;
  s4base)  # the step at batch 64 (profiled, as shipped now), GPT-B decode (profiled), a whole generation at 16 with room to compile
    timeout 170 python -m tools.bench --model var-d16 --batch 64 --pipeline "$P" --repeats 15 --warmup 3 \
      --profile --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_last.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 80 python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --profile --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" > "$OUT/gpt_b_decode.log" 2>&1
    grep -A4 "^workload" "$OUT/gpt_b_decode.log" | cut -c1-160; grep -i "error" "$OUT/gpt_b_decode.log" | tail -3
    timeout 300 python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" --repeats 5 --warmup 2 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_all.json" > "$OUT/var_d16_all.log" 2>&1
    grep -A4 "^workload" "$OUT/var_d16_all.log" | cut -c1-160; grep -i "error" "$OUT/var_d16_all.log" | tail -3 ;;
  step2)  # the step at batch 64 and 16, then the GPU tests only
    timeout 240 python -m tools.bench --model var-d16 --batch 64,16 --pipeline "$P" --repeats 15 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-eager,cuda-fp8 \
      --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1
    grep -A6 "^workload" "$OUT/var_d16_last.log" | head -30; grep -i "error" "$OUT/var_d16_last.log" | tail -3
    timeout 100 python -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_kernels.py tests/test_cuda_lower.py \
      tests/test_cuda_target.py tests/test_torch_int8.py tests/test_device.py > "$OUT/pytest_gpu.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed" "$OUT/pytest_gpu.log" | cut -c1-250 | tail -20 ;;
  smoke)  # the CUDA runners on a tiny VAR: seconds, before the long runs
    python -m tools.bench --model var-tiny --batch 4 --pipeline "$P" --repeats 3 --warmup 1 \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-eager,cuda-fp8 2>&1 | tail -12 ;;
  step)
    python -m tools.bench --model var-d16 --batch 64,16,100 --pipeline "$P" --repeats 20 --warmup 3 --profile \
      --backends torch-fp16-graphs,cuda-int8,cuda-int8-eager,cuda-fp8 \
      --json "$OUT/var_d16_last.json" > "$OUT/var_d16_last.log" 2>&1; grep -A6 "^workload\|^backend" "$OUT/var_d16_last.log" | head -60 ;;
  generation)
    python -m tools.bench --model var-d16 --steps all --batch 16 --pipeline "$P" --repeats 5 --warmup 2 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/var_d16_all.json" 2>&1 | tee "$OUT/var_d16_all.log" | tail -12
    python -m tools.bench --model gpt-b-decode --batch 64 --pipeline "$P" --repeats 20 --warmup 3 \
      --backends torch-fp16-graphs,cuda-int8 --json "$OUT/gpt_b_decode.json" 2>&1 | tee "$OUT/gpt_b_decode.log" | tail -8 ;;
esac
