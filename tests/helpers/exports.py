"""An exported student, used as its users use it: in a fresh Python that imports timm (and
onnxruntime), never remem_ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

# loads the folder with timm alone, normalises with the config's mean/std, and writes the
# logits (and onnxruntime's, where model.onnx exists) beside the inputs
_SCORE = """
import json, sys
from pathlib import Path
import numpy as np, timm, torch
folder, work = Path(sys.argv[1]), Path(sys.argv[2])
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
cfg = timm.data.resolve_data_config({}, model=model)
images = torch.from_numpy(np.load(work / "images.npy"))
mean, std = (torch.tensor(cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
x = (images - mean) / std
with torch.no_grad():
    np.save(work / "logits.npy", model(x).numpy())
if (folder / "model.onnx").is_file():
    import onnxruntime
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.save(work / "onnx_logits.npy", session.run(None, {"images": x.numpy()})[0])
json.dump({"remem_ray imported": any(m.split(".")[0] == "remem_ray" for m in sys.modules),
           "input_size": list(cfg["input_size"]),
           "label_names": model.pretrained_cfg.get("label_names")}, open(work / "seen.json", "w"))
"""


def score_in_fresh_process(folder: Path, images: np.ndarray, work: Path) -> dict:
    """{"logits", "onnx_logits" (or None), "remem_ray imported", "input_size", "label_names"} from a
    fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "images.npy", images.astype(np.float32))
    # as many torch threads as this process (one under pytest-xdist): logits are compared bit for bit,
    # and a float sum's rounding depends on how many threads split it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(
        [sys.executable, "-c", _SCORE, str(folder), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads((work / "seen.json").read_text())
    seen["logits"] = np.load(work / "logits.npy")
    onnx = work / "onnx_logits.npy"
    seen["onnx_logits"] = np.load(onnx) if onnx.is_file() else None
    return seen
