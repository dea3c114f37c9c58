"""torch.compile once per node (issue 26): a model's first compile on a node against a later run's.

Each run is a fresh Python process (as each Train run's worker is) that builds the model, wraps
it as the loops do (`remem_ray.train.common.runnable_model`, compile on) and times its first
training step against its second: the difference is the compile. Both use one inductor cache
folder (`TORCHINDUCTOR_CACHE_DIR`, here a fresh temp folder; on a node, torch's default
/tmp/torchinductor_<user> is one folder for every trial's workers): the first process finds it
empty, the second finds what the first left.

    python -m benchmarks.compile_cache [--model resnet18 --img 224 --batch 64 --device cuda]
    python -m benchmarks.compile_cache --model resnet10t --img 32 --batch 16 --device cpu   # no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import machine, table, verdict

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import json, os, sys, time
import torch
from remem_ray.models import create_model
from remem_ray.train.common import runnable_model

name, img, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
model = create_model(name, 10, img).to(device)
wrapped, channels_last = runnable_model(model, device, True)
optimizer = torch.optim.AdamW(model.parameters())
images = torch.randn(batch, 3, img, img, device=device)
labels = torch.randint(0, 10, (batch,), device=device)
if channels_last:
    images = images.contiguous(memory_format=torch.channels_last)


def step():
    began = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(wrapped(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


first, second = step(), step()
cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
print(json.dumps({"compile_seconds": first - second, "step_seconds": second, "cache": cache}))
"""


def one_run(cache: Path, model: str, img: int, batch: int, device: str) -> dict:
    # Triton's kernels too: a TRITON_CACHE_DIR set on the machine outranks inductor's folder, and
    # its kernels from an earlier call made the "cold" run warm
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    args = [sys.executable, "-c", ONE_RUN, model, str(img), str(batch), device]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"compile_cache: the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--target", type=float, default=0.25, help="second compile / first, at most")
    args = parser.parse_args(argv)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="remem-compile-") as tmp:
        cold = one_run(Path(tmp), args.model, args.img, args.batch, args.device)
        print(f"first run: {json.dumps(cold)}", flush=True)  # kept if the second is cut short
        warm = one_run(Path(tmp), args.model, args.img, args.batch, args.device)
        print(f"second run: {json.dumps(warm)}", flush=True)
    assert cold["cache"] == warm["cache"] == tmp, (cold, warm)  # torch kept the folder it was given
    ratio = warm["compile_seconds"] / cold["compile_seconds"]
    rows = [
        ["measure", "value", "target", "verdict"],
        [
            f"first compile on the node ({args.model}, {args.img} px, batch {args.batch}, {args.device})",
            f"{cold['compile_seconds']:.1f} s",
            "-",
            "-",
        ],
        ["second run's compile (a fresh process, the node's cache)", f"{warm['compile_seconds']:.1f} s", "-", "-"],
        ["second / first", f"{ratio:.2f}", f"<= {args.target}", verdict(ratio, args.target)],
        [
            "step after compile: first run / second run",
            f"{cold['step_seconds']:.3f} s / {warm['step_seconds']:.3f} s",
            "-",
            "-",
        ],
    ]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
