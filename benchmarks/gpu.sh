#!/usr/bin/env bash
# One accelerator, under 10 minutes: the paper suite (SimCLR and MICLe steps of R50-1x, R50-4x
# and R152-2x at 224 px in bfloat16, each at the largest global batch from 256 down that fits)
# and the host input pipeline's sustained 224-px views/s on real X-rays, set against the demand
# of the measured R50-1x step. JSON into OUT_DIR (default benchmarks/results).
#
#   pip install -e ".[test]" && pip install -U "jax[cuda12]"   # or jax[tpu]
#   bash benchmarks/gpu.sh [OUT_DIR]
#   NIH=/path/to/nih_cxr_1000 bash benchmarks/gpu.sh            # real images elsewhere
#   PYTHON=python3 ROW_TIMEOUT=300 bash benchmarks/gpu.sh       # interpreter; seconds per row
#   ROWS='simclr:r50_1x simclr:r152_2x' bash benchmarks/gpu.sh    # some rows (method:model)
#   bash benchmarks/gpu.sh OUT_DIR   # again, the same day: rows already in OUT_DIR's suite
#                                    # file are kept and skipped (a run cut short resumes)
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh /tmp/out               # tiny sizes: CPU smoke test
#
# Each row (method x model) runs in its own process: the device's peak memory is then that
# row's own, and a row that fails or runs out of time costs only itself. Rows run fastest-first
# (R50-1x SimCLR, whose rate the pipeline must feed, comes first); the suite file holds the rows
# that finished, in the order simclr then micle, R50-1x, R50-4x, R152-2x. Only the step needs
# JAX; the pipeline part needs TensorFlow and is skipped, with a message, where it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
out=${1:-benchmarks/results}
nih=${NIH:-../shared/data/nih_cxr_1000}
row_timeout=${ROW_TIMEOUT:-0}  # 0: no limit
mkdir -p "$out"
step_args=(--image_size 224 --dtype bfloat16 --batch_size 256 --fit --steps 10 --warmup 2)
data_args=(--size 224 --steps 10)
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  step_args=(--image_size 32 --dtype bfloat16 --batch_size 8 --steps 1 --warmup 0)
  data_args=(--size 64 --batch 8 --steps 2)
fi
kind=$("$py" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))") || exit 1
stamp=${STAMP:-$(date -u +%Y%m%d)}
suite="$out/gpu_${kind}_paper_suite_${stamp}.json"
rows_dir=$(mktemp -d)
trap 'rm -rf "$rows_dir"' EXIT
if [[ -f "$suite" ]]; then  # an earlier run today: its rows, one file per row, as if run now
  "$py" - "$suite" "$rows_dir" <<'PY' || exit 1
import json, sys

suite, rows_dir = sys.argv[1:]
old = json.load(open(suite))
for r in old["results"]:
    name = f"{r['label']}.{r['variant'].removesuffix('_sk0')}"
    with open(f"{rows_dir}/{name}.json", "w") as f:
        json.dump({"environment": old["environment"], "results": [r]}, f)
    print(f"kept from {suite}: {name}", file=sys.stderr)
PY
fi
merge() {  # the finished rows -> the suite file, rewritten after each row (a kill keeps them)
  "$py" - "$rows_dir" "$suite" <<'PY'
import json, os, sys

rows_dir, suite = sys.argv[1:]
sys.path.insert(0, "benchmarks")
from bench_table import print_table

order = [f"{m}.{v}" for m in ("simclr", "micle") for v in ("r50_1x", "r50_4x", "r152_2x")]
reports = [json.load(open(p)) for n in order if os.path.exists(p := f"{rows_dir}/{n}.json")]
if not reports:
    sys.exit("no row of the paper suite finished")
env = dict(reports[0]["environment"], config="paper suite (benchmarks/gpu.sh)")
results = [r for rep in reports for r in rep["results"]]
with open(suite, "w") as f:
    json.dump({"environment": env, "results": results}, f, indent=2)
print_table(results)
print(f"wrote {suite} ({len(results)} of {len(order)} rows)")
PY
}
failed=0
rows=${ROWS:-simclr:r50_1x micle:r50_1x simclr:r152_2x micle:r152_2x simclr:r50_4x micle:r50_4x}
for row in $rows; do
  method=${row%%:*} model=${row#*:}
  if [[ -z "${ROWS:-}" && -f "$rows_dir/$method.$model.json" ]]; then
    echo "== $method $model: in $suite already, skipped (ROWS=$method:$model reruns it)" >&2
    continue
  fi
  echo "== $method $model" >&2
  if timeout "$row_timeout" "$py" benchmarks/bench_train.py --config "configs/$method.py" \
    --variant "$model" "${step_args[@]}" --out "$rows_dir/$method.$model.json"; then
    merge >/dev/null || exit 1
  else
    echo "row $method $model failed or ran out of time (ROW_TIMEOUT=$row_timeout)" >&2
    failed=1
  fi
done
merge || exit 1
# The pipeline must feed the fastest step of the suite on ONE accelerator: R50-1x SimCLR.
demand=$("$py" - "$suite" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
print(max((r["images_per_s_per_device"] for r in rows if r["variant"] == "r50_1x_sk0"), default=0))
PY
)
if ! "$py" -c "import tensorflow" 2>/dev/null; then
  echo "no TensorFlow for $py: input pipeline not measured" >&2
elif [[ -d "$nih" ]]; then
  "$py" benchmarks/bench_data.py throughput --nih "$nih" "${data_args[@]}" --demand "$demand" \
    --out "$out/gpu_${kind}_pipeline_${stamp}.json" || failed=1
else
  echo "no real images at $nih (set NIH=...): input pipeline not measured" >&2
fi
echo "results: $out/gpu_${kind}_*_${stamp}.json"
exit $failed
