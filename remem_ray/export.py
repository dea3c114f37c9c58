"""A distilled student, ready to ship: a timm model folder, a model card, and ONNX on request.

    <target>/config.json         timm's config: architecture, classes, input size, mean/std, eval crop
    <target>/model.safetensors   the weights (no pickle on the way out)
    <target>/README.md           the model card: where the student came from, its accuracy, sha256
    <target>/model.onnx          with onnx=True: dynamic batch, checked against PyTorch on a batch

`timm.create_model("local-dir:<target>", pretrained=True)` loads the folder with timm alone.
The folder is written beside the target and renamed into place (a local target), or uploaded
file by file with the card last (an s3:// target): a target that has a card is whole.

Two exports to one target at once: exactly one lands, the other stops with one line and writes
nothing there. Locally the rename is the fence (it replaces only an empty folder); on S3 an
exclusive claim object (`.remem-export-claim`, If-None-Match) taken before the first upload and
removed after the card, then a listing that must show nothing but the claim (an export that
finished in between, claim and all, is seen there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remem_ray.errors import ResourceError, UserInputError
from remem_ray.storage import Storage, one_line, preflight

if TYPE_CHECKING:  # torch and timm are imported where a model is read: an export's bad --to or
    from torch import nn  # --trial is refused in a second, not after their 4 s of imports

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, ONNX_FILE = "config.json", "model.safetensors", "README.md", "model.onnx"
CLAIM_FILE = ".remem-export-claim"  # an s3:// export's fence while it uploads (removed after the card)
# largest |logit difference| between onnxruntime and PyTorch on the check batch: absolute plus
# relative to the largest logit (float32 rounding grows with it: an EfficientNetV2 with logits of
# 228 differed by 8e-4, 4e-6 of them, and a fixed 1e-4 refused it)
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-5
# pretrained_cfg fields that describe the architecture's hub weights, not these
_SOURCE_FIELDS = ("tag", "hf_hub_id", "url", "file", "license", "origin_url", "paper_ids", "paper_name", "notes")


@dataclass(frozen=True)
class ModelCard:
    """What the card says: a title and rows of facts (dataset, teacher, rho, accuracy...)."""

    title: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def render(self, weights_sha256: str, usage: str) -> str:
        rows = [*self.facts.items(), ("weights sha256", f"`{weights_sha256}`")]
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        return f"# {self.title}\n\n| | |\n|---|---|\n{table}\n\n## Use\n\n{usage}\n"


def _classes(meta: dict[str, Any], shown: int = 10) -> str:
    """The class count, and their names by output index where the data named them."""
    names = meta.get("class_names")
    if not names:
        return str(meta["num_classes"])
    listed = ", ".join(f"{i}: {n}" for i, n in enumerate(names[:shown]))
    more = f", ... ({len(names) - shown} more in config.json's label_names)" if len(names) > shown else ""
    return f"{meta['num_classes']} ({listed}{more})"


def checkpoint_facts(location: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint says of itself: architecture, classes, input, its epoch and accuracy."""
    metrics = meta.get("metrics") or {}
    facts: dict[str, Any] = {
        "architecture": f"`{meta['model']}` (timm)",
        "classes": _classes(meta),
        "input size": f"{meta['img_size']} x {meta['img_size']}",
        "checkpoint": f"`{location}`",
    }
    if meta.get("epoch") is not None:
        facts["epoch"] = meta["epoch"]
    for key, label in (("val_acc", "val accuracy"), ("test_acc", "test accuracy")):
        if metrics.get(key) is not None:
            facts[label] = f"{float(metrics[key]):.4f}"
    return facts


@dataclass(frozen=True)
class Exported:
    target: str
    files: tuple[str, ...]
    weights_sha256: str
    onnx_max_diff: float | None


def load_student(source: Storage, rel: str) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model (its files checked against their sha256) and meta, refused where
    plain timm could not rebuild it."""
    import timm

    from remem_ray.checkpoints import read_checkpoint
    from remem_ray.models import create_model
    from remem_ray.timm_models import REGISTERED_HERE

    state, meta = read_checkpoint(source, rel)
    name = meta["model"]
    if meta.get("reweighting"):
        raise UserInputError(f"export: {source.uri(rel)} is MLP-reweighted (a teacher?); plain timm cannot rebuild it")
    if name.startswith("hf-hub:"):
        raise UserInputError(f"export: {name} names a hub repo, not a timm architecture the export's config could name")
    if name in REGISTERED_HERE or not timm.is_model(name):
        raise UserInputError(f"export: {name} is registered by remem_ray, not timm: timm alone cannot build it")
    model = create_model(name, meta["num_classes"], meta["img_size"], meta["model_kwargs"])
    model.load_state_dict(state)
    return model.eval(), meta


def data_config(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing the student was evaluated with: its checkpoint's record (newer runs),
    else the timm defaults at the trained size."""
    from remem_ray.models import data_config_of

    timm_cfg = data_config_of(model)
    view = meta.get("eval_view") or {}
    size = int(view.get("img_size", meta["img_size"]))
    return {
        "input_size": (3, size, size),
        "crop_pct": float(view.get("crop_pct", timm_cfg.get("crop_pct") or 1.0)),
        "crop_mode": "center",
        "interpolation": str(view.get("interpolation", timm_cfg.get("interpolation") or "bilinear")),
        "mean": tuple(meta.get("mean") or timm_cfg["mean"]),
        "std": tuple(meta.get("std") or timm_cfg["std"]),
    }


def write_timm_folder(model: nn.Module, meta: dict[str, Any], folder: Path) -> str:
    """config.json and model.safetensors into `folder`; the weights file's sha256."""
    from safetensors.torch import save_file

    from remem_ray.timm_adapter import write_timm_config

    weights = folder / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = folder / CONFIG_FILE
    write_timm_config(model, str(config), data_config(model, meta), label_names=meta.get("class_names"))
    cfg = json.loads(config.read_text())
    for name in _SOURCE_FIELDS:
        cfg["pretrained_cfg"].pop(name, None)
    config.write_text(json.dumps(cfg, indent=2))
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def write_onnx(model: nn.Module, meta: dict[str, Any], folder: Path) -> float:
    """model.onnx (dynamic batch), checked with onnxruntime on a batch; the largest logit difference."""
    import torch

    try:
        import onnxruntime
    except ImportError:
        raise UserInputError("--onnx: needs onnx and onnxruntime (pip install 'remem-ray[export]')") from None
    size = int((meta.get("eval_view") or {}).get("img_size", meta["img_size"]))
    batch = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = folder / ONNX_FILE
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes: not the user's to act on
            torch.onnx.export(
                model,
                (batch[:1],),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic batch as asked
            )
    except Exception as exc:  # many kinds; one line names the architecture
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"--onnx: {meta['model']} cannot be exported to ONNX: {first}") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    diff = float(abs(got - want).max())
    tolerance = onnx_tolerance(want)
    if diff > tolerance:
        raise UserInputError(f"--onnx: the ONNX model's logits differ from PyTorch by {diff:.1e} (> {tolerance:.1e})")
    return diff


def onnx_tolerance(logits) -> float:
    """How far the ONNX model's logits may be from PyTorch's (ONNX_ATOL, ONNX_RTOL)."""
    return ONNX_ATOL + ONNX_RTOL * float(abs(logits).max())


def local_dir_of(target: str) -> str:
    """What timm's `local-dir:` takes for an export at `target`: a local folder (an s3:// export
    is copied down first, e.g. `aws s3 cp --recursive`)."""
    return "PATH/TO/A/LOCAL/COPY" if target.startswith("s3://") else target


def usage_text(target: str, onnx: bool) -> str:
    lines = [
        "```python",
        "import timm, torch",
        *(["# copy the folder down first: timm reads local folders only"] if target.startswith("s3://") else []),
        f'model = timm.create_model("local-dir:{local_dir_of(target)}", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)  # PIL image -> normalised tensor",
        "logits = model(transform(image).unsqueeze(0))",
        "```",
    ]
    if onnx:
        lines += [
            "",
            "```python",
            "import onnxruntime",
            f'session = onnxruntime.InferenceSession("{target}/{ONNX_FILE}")',
            'logits = session.run(None, {"images": batch.numpy()})[0]  # batch: normalised, as above',
            "```",
        ]
    return "\n".join(lines)


def check_target(target: str, endpoint: str | None) -> Storage:
    """The target's storage; refused if it is a file, or a folder that is not empty (nothing is
    overwritten); an s3:// one's endpoint, credentials and bucket proven first (a dead endpoint
    took the client's two minutes of retries, then named the sweep's storage)."""
    if "://" in target and not target.startswith("s3://"):
        raise UserInputError(f"--to: {target} is neither a folder path nor an s3://bucket/prefix URI")
    if target.startswith("s3://"):
        preflight(target, endpoint, root_field="--to", endpoint_field="--endpoint")
    elif Path(target).exists() and not Path(target).is_dir():
        raise UserInputError(f"--to: {target} is a file")
    storage = Storage(target, endpoint)
    present = storage.list_dir() if storage.exists() else []
    if present == [CLAIM_FILE]:
        raise _claim_held(target)
    if present:
        raise UserInputError(f"--to: {target} exists and is not empty")
    return storage


def _claim_held(target: str) -> UserInputError:
    return UserInputError(
        f"--to: an export to {target} is running, or one was cut off ({target}/{CLAIM_FILE} is there); "
        f"if none is running, delete that object and export again"
    )


def _filled_meanwhile(target: str) -> UserInputError:
    return UserInputError(f"--to: {target} was filled by another export while this one ran; this one wrote nothing")


def export_student(
    source: Storage,
    rel: str,
    target: str,
    facts: Mapping[str, Any] | None = None,
    onnx: bool = False,
    endpoint: str | None = None,
) -> Exported:
    """Export checkpoint `rel` under `source` to `target` (a folder or s3:// URI); all or nothing.
    The card lists `facts` (where the student came from), then what the checkpoint says of itself."""
    out = check_target(target, endpoint)
    model, meta = load_student(source, rel)
    card = ModelCard(
        f"{meta['model']} distilled with remem-ray", {**(facts or {}), **checkpoint_facts(source.uri(rel), meta)}
    )
    local = None if out.is_s3 else Path(out.path())  # (resolved: a link to an empty folder is followed)
    # staged beside a local target (one rename puts it in place: the parents it needs are made
    # now, and removed again if the export fails), in the temp folder for an s3:// one
    made: list[Path] = []
    staging: Path | None = None
    placed = False
    try:
        try:
            if local is not None:
                _make_parents(local, made)
            staging = Path(tempfile.mkdtemp(prefix=".remem-export-", dir=local.parent if local else None))
        except OSError as exc:
            raise ResourceError(f"--to: cannot write {target}: {exc.strerror or one_line(exc)}") from None
        sha = write_timm_folder(model, meta, staging)
        diff = write_onnx(model, meta, staging) if onnx else None
        (staging / CARD_FILE).write_text(card.render(sha, usage_text(target, onnx)))
        files = tuple(sorted(p.name for p in staging.iterdir()))
        _usual_modes(staging)
        if local is None:
            _upload_fenced(staging, out, files, target)
        else:
            _rename_into_place(staging, local, target)
        placed = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not placed:
            for folder in reversed(made):  # deepest first; only while empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return Exported(target, files, sha, diff)


def _make_parents(local: Path, made: list[Path]) -> None:
    """Create the target's missing parent folders one level at a time, appending to `made` each one
    this call created (a folder another process made meanwhile is not ours to remove)."""
    for folder in [*reversed(local.parent.parents), local.parent]:
        if folder.is_dir():
            continue
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        made.append(folder)


def _rename_into_place(staging: Path, local: Path, target: str) -> None:
    """One rename: it replaces nothing but an empty folder, so of two exports racing to one
    target the second finds it filled and fails, writing nothing there."""
    try:
        os.rename(staging, local)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _filled_meanwhile(target) from None
        raise ResourceError(f"--to: cannot write {target}: {exc.strerror or one_line(exc)}") from None


def _usual_modes(folder: Path) -> None:
    """The modes a folder made with mkdir and files written with open would have (the staging
    folder is mkdtemp's 0700, some writers make 0600 files): others may read an export."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _upload_fenced(staging: Path, out: Storage, files: tuple[str, ...], target: str) -> None:
    """Every file, the card last, under the target's claim; on any failure what was uploaded is
    removed again. The claim is taken exclusively, then the target must hold nothing else: an
    export that took it, filled the target and let it go between our check and our claim is
    seen there, and one still uploading holds it. The claim carries a token of ours, read back
    before the card: a claim not ours by then (a server that ignored If-None-Match, or one
    removed by mistake) stops this export short of the card, so the target is never called whole."""
    token = os.urandom(16).hex()
    # refused, a retried PUT whose first try landed answers 412 too: then the claim holds our token
    if not out.create_exclusive(CLAIM_FILE, token.encode()) and _claim_token(out) != token:
        raise _claim_held(target)
    ours = True
    try:
        if set(out.list_dir()) - {CLAIM_FILE}:
            raise _filled_meanwhile(target)

        def still_ours() -> None:
            nonlocal ours
            ours = _claim_token(out) == token
            if not ours:
                raise _filled_meanwhile(target)

        _upload(staging, out, files, before_card=still_ours)
    finally:
        if ours:
            try:
                out.delete_file(CLAIM_FILE)
            except ResourceError as exc:
                print(f"remem: warning: could not remove {target}/{CLAIM_FILE} ({exc}); delete it", file=sys.stderr)


def _claim_token(out: Storage) -> str | None:
    try:
        return out.read_text(CLAIM_FILE)
    except ResourceError:
        return None


def _upload(staging: Path, out: Storage, files: tuple[str, ...], before_card=lambda: None) -> None:
    """Every file, the card last (`before_card` may stop it there); on any failure, Ctrl-C
    included, what was uploaded is removed again."""
    order = [f for f in files if f != CARD_FILE] + [CARD_FILE]
    done: list[str] = []
    try:
        for name in order:
            if name == CARD_FILE:
                before_card()
            out.write_bytes(name, (staging / name).read_bytes())
            done.append(name)
    except BaseException:
        for name in done:
            with contextlib.suppress(ResourceError):
                out.delete_file(name)
        raise
