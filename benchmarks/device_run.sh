#!/usr/bin/env bash
# Calls on the lent GPU machine (../shared/gpu/README.md): Train-run start latencies of the
# smoke sweep on CPU workers and on GPU workers (benchmarks.sweep_overhead), then the input
# pipeline and end-to-end set (benchmarks.gpu). Every step is bounded; logs go to $OUT.
#   run: bash benchmarks/device_run.sh sweeps|gpu      (carry .gpu-kit; up to 9 min and about 2.5 min:
#   one call holds at most 600 s, so run each in its own call)
set -u
what=${1:?say sweeps or gpu}
source .gpu-kit/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi -L; nproc; python3 -c "import torch, timm, ray; print(torch.__version__, timm.__version__, ray.__version__)"; } > "$OUT/machine.txt" 2>&1
if [[ $what != gpu ]]; then
  python3 - <<'PY'
import yaml
spec = yaml.safe_load(open("search_spaces/smoke.yaml"))
for role in ("teacher", "student"):
    spec["sweep"]["resources"][role]["gpus_per_worker"] = 0.5
open("/tmp/smoke_gpu.yaml", "w").write(yaml.safe_dump(spec))
PY
  timeout 270 python3 -m benchmarks.sweep_overhead --spec search_spaces/smoke.yaml --log "$OUT/sweep_smoke_cpu.log" \
    > "$OUT/sweep_smoke_cpu.txt" 2>&1; echo "rc=$?" >> "$OUT/sweep_smoke_cpu.txt"
  timeout 270 python3 -m benchmarks.sweep_overhead --spec /tmp/smoke_gpu.yaml --log "$OUT/sweep_smoke_gpu.log" \
    > "$OUT/sweep_smoke_gpu.txt" 2>&1; echo "rc=$?" >> "$OUT/sweep_smoke_gpu.txt"
fi
if [[ $what != sweeps ]]; then
  timeout 280 python3 -m benchmarks.gpu --images 10000 > "$OUT/gpu.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu.txt"
fi
