#!/usr/bin/env bash
# Calls on the lent GPU machine (../shared/gpu/README.md): Train-run start latencies of the
# smoke sweep on CPU workers and on GPU workers (benchmarks.sweep_overhead), then the input
# pipeline and end-to-end set (benchmarks.gpu). Every step is bounded; logs go to $OUT.
#   run: bash benchmarks/device_run.sh sweeps|gpu      (carry .gpu-kit; up to 9 min and about 2.5 min:
#   one call holds at most 600 s, so run each in its own call)
#   bash benchmarks/device_run.sh compare DIR          (about 8 min; carry .gpu-kit and DIR, an older
#   checkout made with `git worktree add` or `git archive`): import times, then the smoke sweep on GPU
#   workers with this checkout and with DIR's, one after the other on the same machine
#   bash benchmarks/device_run.sh gpusweep            (carry .gpu-kit; about 9.5 min at most): the whole-sweep GPU-busy
#   share (benchmarks.gpu_sweep, stopped as Ctrl-C does at 280 s and accounted for up to the stop;
#   the GPU's samples kept in $OUT), the teacher epoch's profile (benchmarks.teacher_profile, trace
#   under $OUT/profile), then torch.compile's second run on the node (benchmarks.compile_cache) if time is
#   left; at most 8 files come back from $OUT, and this writes 8
#   bash benchmarks/device_run.sh compile             (carry .gpu-kit; up to 5 min): compile_cache alone, for
#   the call right after gpusweep while the machine is still warm (within its 30 s idle release; give it
#   timeout_s of the budget left less 20 s: gpusweep rarely has time left for it)
#   bash benchmarks/device_run.sh profile             (carry .gpu-kit; up to 8 min): the profile, then benchmarks.gpu
set -u
what=${1:?say sweeps, gpu, gpusweep, compile, profile or compare}
source .gpu-kit/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi -L; nproc; timeout 120 python3 -c "import torch, timm, ray; print(torch.__version__, timm.__version__, ray.__version__)"; } > "$OUT/machine.txt" 2>&1
# the smoke spec with half a GPU per Train worker
gpu_smoke() {
  python3 -c '
import yaml
spec = yaml.safe_load(open("search_spaces/smoke.yaml"))
for role in ("teacher", "student"):
    spec["sweep"]["resources"][role]["gpus_per_worker"] = 0.5
open("/tmp/smoke_gpu.yaml", "w").write(yaml.safe_dump(spec))
'
}
if [[ $what == gpusweep ]]; then
  # the GPU figures in order of need: the whole sweep, the teacher epoch's profile, then
  # the compile cache with whatever is left of the call's 600 s
  # 280 s of sweep, then its Ctrl-C and at most 60 s to end (figures up to the stop), within 390
  # with the imports and the images; the whole call about 560 s, leaving compile its own call
  timeout -k 10 390 python3 -m benchmarks.gpu_sweep --deadline 280 --samples "$OUT/gpu_samples.csv" \
    --log "$OUT/gpu_sweep.log" > "$OUT/gpu_sweep.txt" 2>&1
  echo "rc=$?" >> "$OUT/gpu_sweep.txt"
  timeout -k 10 140 python3 -m benchmarks.teacher_profile --out "$OUT/profile" > "$OUT/teacher_profile.txt" 2>&1
  echo "rc=$?" >> "$OUT/teacher_profile.txt"; gzip -f "$OUT/profile/teacher_epoch.json" 2>/dev/null
  left=$((580 - SECONDS))
  if (( left > 60 )); then
    timeout -k 10 $left python3 -m benchmarks.compile_cache > "$OUT/compile_cache.txt" 2>&1; echo "rc=$?" >> "$OUT/compile_cache.txt"
  fi
  exit 0
fi
if [[ $what == compile ]]; then
  timeout -k 10 280 python3 -m benchmarks.compile_cache > "$OUT/compile_cache.txt" 2>&1; echo "rc=$?" >> "$OUT/compile_cache.txt"
  exit 0
fi
if [[ $what == profile ]]; then  # the teacher profile alone, then the end-to-end set (about 5 min)
  timeout 200 python3 -m benchmarks.teacher_profile --out "$OUT/profile" > "$OUT/teacher_profile.txt" 2>&1
  echo "rc=$?" >> "$OUT/teacher_profile.txt"; gzip -f "$OUT/profile/teacher_epoch.json" 2>/dev/null
  timeout 280 python3 -m benchmarks.gpu --images 10000 > "$OUT/gpu.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu.txt"
  exit 0
fi
if [[ $what == compare ]]; then
  base=${2:?compare needs the folder of an older checkout}
  # a fresh machine's first imports read torch and CUDA from a cold disk: time them twice
  for i in 1 2; do
    timeout 60 python3 -X importtime -c "import remem_ray.train.phases" 2> "$OUT/importtime_$i.txt"
    tail -1 "$OUT/importtime_$i.txt" >> "$OUT/imports.txt"
  done
  gpu_smoke
  timeout 230 python3 -m benchmarks.sweep_overhead --spec /tmp/smoke_gpu.yaml --log "$OUT/new.log" \
    > "$OUT/new.txt" 2>&1; echo "rc=$?" >> "$OUT/new.txt"
  (cd "$base" && PYTHONPATH=/tmp/site:$PWD timeout 230 python3 -m benchmarks.sweep_overhead --spec /tmp/smoke_gpu.yaml \
    --log "$OUT/base.log" > "$OUT/base.txt" 2>&1; echo "rc=$?" >> "$OUT/base.txt")
  exit 0
fi
if [[ $what != gpu ]]; then
  gpu_smoke
  timeout 270 python3 -m benchmarks.sweep_overhead --spec search_spaces/smoke.yaml --log "$OUT/sweep_smoke_cpu.log" \
    > "$OUT/sweep_smoke_cpu.txt" 2>&1; echo "rc=$?" >> "$OUT/sweep_smoke_cpu.txt"
  timeout 270 python3 -m benchmarks.sweep_overhead --spec /tmp/smoke_gpu.yaml --log "$OUT/sweep_smoke_gpu.log" \
    > "$OUT/sweep_smoke_gpu.txt" 2>&1; echo "rc=$?" >> "$OUT/sweep_smoke_gpu.txt"
fi
if [[ $what != sweeps ]]; then
  timeout 280 python3 -m benchmarks.gpu --images 10000 > "$OUT/gpu.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu.txt"
fi
