#!/usr/bin/env bash
# One accelerator, under 10 minutes: the paper suite (SimCLR and MICLe steps of R50-1x, R50-4x
# and R152-2x at 224 px in bfloat16, each at the largest global batch from 256 down that fits)
# and the host input pipeline's sustained 224-px views/s on real X-rays, set against the demand
# of the measured R50-1x step. JSON into OUT_DIR (default benchmarks/results).
#
#   pip install -e ".[test]" && pip install -U "jax[cuda12]"   # or jax[tpu]
#   bash benchmarks/gpu.sh [OUT_DIR]
#   NIH=/path/to/nih_cxr_1000 bash benchmarks/gpu.sh            # real images elsewhere
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh /tmp/out               # tiny sizes: CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
nih=${NIH:-../shared/data/nih_cxr_1000}
mkdir -p "$out"
suite_args=(--suite paper --fit --steps 10 --warmup 2)
data_args=(--size 224 --steps 10)
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  suite_args=(--suite paper --image_size 32 --batch_size 8 --steps 1 --warmup 0)
  data_args=(--size 64 --batch 8 --steps 2)
fi
kind=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
stamp=$(date -u +%Y%m%d)
suite="$out/gpu_${kind}_paper_suite_${stamp}.json"
python benchmarks/bench_train.py "${suite_args[@]}" --out "$suite"
# The pipeline must feed the fastest step of the suite on ONE accelerator: R50-1x SimCLR.
demand=$(python - "$suite" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
print(max(r["images_per_s_per_device"] for r in rows if r["variant"] == "r50_1x_sk0"))
PY
)
if [[ -d "$nih" ]]; then
  python benchmarks/bench_data.py throughput --nih "$nih" "${data_args[@]}" --demand "$demand" \
    --out "$out/gpu_${kind}_pipeline_${stamp}.json"
else
  echo "no real images at $nih (set NIH=...): input pipeline not measured" >&2
fi
echo "results: $out/gpu_${kind}_*_${stamp}.json"
