"""The run spec: one frozen pydantic model tree, read from YAML with safe_load.

Validation here is pure: field rules and cross-field rules, no file system and no model
builds, so reading a stored spec (status, report, every trial) stays cheap. What needs the
outside world (weights files, timm builds) is checked by `remem_ray.spec_checks` before
work starts; both give one line naming the field, which the CLI prints with exit code 2.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from remem_ray.errors import SpecError
from remem_ray.search_params import SEARCH_PARAMS, ranged_params

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _reject_parent_refs(path: str) -> None:
    parts = re.split(r"[\\/]+", path.split("://", 1)[-1])
    if ".." in parts:
        raise ValueError(f"{path!r} must not contain '..'")


def weights_kind(weights: str | None) -> str:
    """What a weights string names: 'none', 'timm' (the hub tag), 'hf-hub', 's3' or 'file'."""
    if weights is None or weights == "none":
        return "none"
    if weights == "timm":
        return "timm"
    if weights.startswith("hf-hub:"):
        return "hf-hub"
    return "s3" if weights.startswith("s3://") else "file"


def _check_weights_source(weights: str | None) -> str | None:
    kind = weights_kind(weights)
    if kind in ("none", "timm"):
        return None if kind == "none" else weights
    assert weights is not None
    if kind == "file" and "://" in weights:
        raise ValueError(f"unsupported scheme in {weights!r}; use 'timm', 'hf-hub:ORG/REPO', a path or s3://")
    _reject_parent_refs(weights)
    return _absolute_local(weights) if kind == "file" else weights


def _safe_location(location: str | None) -> str | None:
    """A path or URI without `..`, local paths made absolute (a spec travels to other processes)."""
    if location is None:
        return None
    _reject_parent_refs(location)
    if "://" in location and not location.startswith("s3://"):
        raise ValueError(f"unsupported scheme in {location!r}; use a local path or s3://bucket/folder")
    if location.startswith("s3://") and "/" not in location[len("s3://") :].strip("/"):
        raise ValueError(f"{location!r} is a whole bucket; use s3://bucket/folder")
    return _absolute_local(location)


def _absolute_local(path: str) -> str:
    """Local paths become absolute when the spec is read: Ray workers run in other folders."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def _matching(pattern: str, message: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        if value is not None and not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


# Field types whose checks travel with them (pure: no file system).
Location = Annotated[str | None, AfterValidator(_safe_location)]
WeightsSource = Annotated[str | None, AfterValidator(_check_weights_source)]
ENDPOINT_URL = r"https?://[^/\s@]+/?"
ENDPOINT_URL_RULE = "must look like http://host:port or https://host (no credentials in it)"
EndpointUrl = Annotated[str | None, _matching(ENDPOINT_URL, ENDPOINT_URL_RULE)]
RegionName = Annotated[  # botocore's own check of a region name, which would fail later in a traceback
    str,
    _matching(
        r"(?![0-9]+$)[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?",
        "must look like us-east-1 (letters, digits, dashes)",
    ),
]
OptunaUrl = Annotated[
    str | None,
    _matching(
        r"(sqlite|postgresql|mysql)(\+\w+)?://\S*",
        "must be an Optuna RDB URL: sqlite:///PATH, postgresql://HOST/DB or mysql://HOST/DB",
    ),
]


class StrictModel(BaseModel):
    """Unknown keys are errors; specs are values, never mutated after validation."""

    # a NaN passed every bound (rho: .nan read 'should be less than or equal to 10'): finite numbers only
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class DataConfig(StrictModel):
    name: str = Field("digits", description="dataset registry name (see remem_ray.data.DATASETS)")
    root: Location = Field(
        None,
        description="dataset folder (a torchvision set's default: ~/.cache/remem-ray/datasets, or "
        "$REMEM_CACHE_DIR/datasets), or for imagefolder a path or s3:// URI",
    )
    download: bool = Field(False, description="let torchvision download the dataset into root")
    img_size: int = Field(16, ge=8, le=1024, description="side of the square images both models see")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="share of train carved out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="share held out as test where there is no test split")
    num_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader worker processes; default: a few on CUDA, none on CPU"
    )
    num_classes: int = Field(10, ge=2, le=1000, description="synthetic dataset only")
    samples_per_class: int = Field(60, ge=4, le=10000, description="synthetic dataset only")
    max_train_samples: int | None = Field(None, ge=10, description="cap on training images (quick runs)")
    pipeline: Literal["auto", "device", "loader"] = Field(
        "auto",
        description="device: decode once into a uint8 store, augment in batches on the device; "
        "loader: torchvision transforms in DataLoader workers; auto: device on CUDA when "
        "the store fits store_budget_gb, else loader",
    )
    store_size: int | None = Field(
        None,
        ge=8,
        le=2048,
        description="device pipeline: short side of stored images; default: native "
        "for equal square images up to img_size / 0.875, else img_size / 0.875",
    )
    store_budget_gb: float = Field(
        8.0,
        ge=0.0,
        le=4096.0,
        description="device pipeline: most GiB its uint8 store may take on the device "
        "(all splits); beyond it the store stays memory-mapped on the host",
    )

    root_identity: str | None = Field(
        None,
        description="set by the sweep driver as it starts (what the image folder holds, "
        "remem_ray/storage/identity.py); a value in a spec is replaced",
    )

    @model_validator(mode="after")
    def _root_where_needed(self) -> DataConfig:
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root is required for imagefolder (a local path or s3:// URI)")
        return self


# Data fields that change where and how fast batches are made, never which pictures: left out of keys.
DATA_FIELDS_WITHOUT_EFFECT = {"num_workers", "download", "store_budget_gb"}


class OptimizerConfig(StrictModel):
    name: str = Field(
        "adamw",
        description="a timm optimizer (timm.optim.list_optimizers()): adamw, lamb, lion, ...; "
        "momentum is SGD with classical momentum, sgd is timm's Nesterov SGD",
    )
    lr: float = Field(2e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="on weight matrices and kernels; never on biases, norms, position "
        "embeddings or class tokens (timm's and DeiT's recipe)",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="optimizers with momentum only (sgd, momentum, ...)")


class ScheduleConfig(StrictModel):
    """Linear warmup then cosine decay, stepped per batch (timm's CosineLRScheduler)."""

    warmup_epochs: float = Field(1.0, ge=0.0, le=1000.0)  # bounded: .inf overflowed in the scheduler
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)


class TeacherConfig(StrictModel):
    model: str = Field("vit_micro_patch4", description="timm model name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm constructor arguments")
    weights: WeightsSource = Field(None, description="None, 'timm' (hub tag), a local file or an s3:// URI")
    weights_identity: str | None = Field(
        None,
        description="set by the sweep driver as it starts (what the weights file holds, "
        "remem_ray/storage/identity.py); a value in a spec is replaced",
    )
    alpha: float = Field(0.9, gt=0.0, le=1.0, description="MLP reweighting factor; 1 = stock model")
    reweight_mode: Literal["remem", "mlp"] = "remem"
    rho: float = Field(0.05, ge=0.0, le=10.0, description="SAM radius; 0 = plain fine-tuning")
    adaptive: bool = Field(False, description="ASAM: scale the perturbation by T_w = |w| (+ asam_eta)")
    asam_eta: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="ASAM: 0 scales every tensor by |w| (pytorch-optimizer); > 0 is Kwon "
        "et al.'s reference, |w| + eta on the parameters named weight (norms' too), 1 on the others",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    epochs: int = Field(20, ge=1, le=10000)
    checkpoint_epochs: list[int] | None = Field(None, description="epochs to save; default: the last")
    batch_size: int = Field(32, ge=1, le=65536)
    grad_clip: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _checkpoints_within_epochs(self) -> TeacherConfig:
        for e in self.checkpoint_epochs or []:
            if not 1 <= e <= self.epochs:
                raise ValueError(f"checkpoint_epochs: {e} is outside 1..epochs ({self.epochs})")
        if self.checkpoint_epochs is not None and not self.checkpoint_epochs:
            raise ValueError("checkpoint_epochs: give at least one epoch, or leave it out for the last")
        return self

    @property
    def saved_epochs(self) -> list[int]:
        return sorted(set(self.checkpoint_epochs or [self.epochs]))


class KDConfig(StrictModel):
    loss: Literal["kd", "dist"] = "kd"
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    weight: float = Field(0.9, ge=0.0, le=1.0, description="share of the distillation term; the rest is CE")


class StudentConfig(StrictModel):
    model: str = Field("resnet10t", description="timm model name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsSource = None
    weights_identity: str | None = Field(
        None,
        description="set by the sweep driver as it starts (what the weights file holds, "
        "remem_ray/storage/identity.py); a value in a spec is replaced",
    )
    teacher_epoch: int | None = Field(None, ge=1, description="teacher checkpoint to distil from; default: last")
    teacher_checkpoint: Location = Field(
        None, description="explicit teacher checkpoint folder (path or s3:// URI); default: this run's"
    )
    kd: KDConfig = Field(default_factory=KDConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    epochs: int = Field(8, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=65536)
    teacher_targets: Literal["online", "cached"] = Field(
        "online",
        description="online: run the teacher on every batch; cached: read its logits for "
        "target_views fixed augmented views per image, computed once per checkpoint",
    )
    target_views: int = Field(8, ge=1, le=256, description="cached targets: augmented views per training image")
    target_view_seed: int = Field(0, ge=0, le=2**31 - 1, description="cached targets: seed of the fixed views")


def default_region() -> str:
    """The AWS region where none is configured: the AWS SDK's variables, else us-east-1. A spec's
    storage.region takes it as its default when read (stored specs keep the value)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class StorageConfig(StrictModel):
    root: str = Field(
        "./remem-results",
        validate_default=True,
        description="local folder or s3://bucket/prefix; local paths are made absolute",
    )
    endpoint: EndpointUrl = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    region: RegionName = Field(
        default_factory=default_region,
        description="the bucket's region (default: AWS_REGION, AWS_DEFAULT_REGION, else us-east-1)",
    )

    @field_validator("root")
    @classmethod
    def _safe_root(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("must not be empty")
        _reject_parent_refs(root)
        if "://" in root and not root.startswith("s3://"):
            raise ValueError(f"unsupported scheme in {root!r}; use a local path or s3://bucket/prefix")
        if root.startswith("s3://"):
            if not root[len("s3://") :].strip("/"):
                raise ValueError("s3:// URI needs a bucket")
            return root.rstrip("/")
        return _absolute_local(root)


class RunSpec(StrictModel):
    """Everything one teacher fine-tuning + distillation run needs.

    The defaults are the embedded demo: digits at 16x16, a micro ViT teacher trained from
    scratch, a ResNet-10t student; about a minute on two CPU cores. Real runs name their
    dataset, a pretrained teacher (weights: timm, a file or s3://) and a student.
    """

    name: str = "digits"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the trained model; auto: on CUDA, off on CPU (where compiling costs "
        "more than it saves)",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _NAME_PATTERN.fullmatch(name) or ".." in name:
            raise ValueError(f"{name!r} must be 1-100 characters of letters, digits, '.', '_' or '-'")
        return name

    @model_validator(mode="after")
    def _teacher_epoch_saved(self) -> RunSpec:
        epoch = self.student.teacher_epoch
        if epoch is not None and self.student.teacher_checkpoint is None and epoch not in self.teacher.saved_epochs:
            raise ValueError(f"student.teacher_epoch: {epoch} is not a saved teacher epoch {self.teacher.saved_epochs}")
        return self

    def teacher_key(self, world_size: int = 1) -> str:
        """Stable hash of the teacher training this spec names: not which epoch is used, nor how
        the training is spelled (see canonical_teacher and canonical_data).

        world_size counts: batch_size is per worker, so more workers train a different teacher.
        A spec spelled canonically (checkpoint_epochs a sorted list, settings without effect left
        at their defaults) keeps the key earlier versions gave it.
        """
        return _teacher_hash(self.seed, world_size, canonical_data(self.data), canonical_teacher(self.teacher))

    def legacy_teacher_keys(self, world_size: int = 1) -> list[str]:
        """Keys earlier versions gave this training, where they differ from teacher_key: they
        hashed the spelling. Those of this spec as written and as canonically spelled, each with
        checkpoint_epochs as written, as the sorted list and as null where null means the same."""
        current = self.teacher_key(world_size)
        keys: list[str] = []
        for data, teacher in (
            (_written_data(self.data), _identified(self.teacher.model_dump(mode="json"), "weights_identity")),
            (canonical_data(self.data), canonical_teacher(self.teacher)),
        ):
            for epochs in _checkpoint_spellings(self.teacher):
                key = _teacher_hash(self.seed, world_size, data, {**teacher, "checkpoint_epochs": epochs})
                if key != current and key not in keys:
                    keys.append(key)
        return keys

    def student_key(self, teacher_world_size: int = 1, world_size: int = 1) -> str:
        """Stable hash of the distillation this spec names: its teacher's key and checkpoint epoch
        (or the explicit checkpoint), the student section spelled canonically (canonical_student),
        the data, the seed and the student's workers (batch_size is per worker). Like the teacher
        key, not where or how fast it runs (device, compile, loader workers)."""
        student = self.student
        if student.teacher_checkpoint is not None:
            teacher: dict[str, Any] = {"checkpoint": student.teacher_checkpoint}
        else:
            epoch = student.teacher_epoch or self.teacher.saved_epochs[-1]
            teacher = {"key": self.teacher_key(teacher_world_size), "epoch": epoch}
        payload = {
            "seed": self.seed,
            "world_size": world_size,
            "data": canonical_data(self.data),
            "teacher": teacher,
            "student": canonical_student(student),
        }
        return _hash(payload)


def _teacher_hash(seed: int, world_size: int, data: dict[str, Any], teacher: dict[str, Any]) -> str:
    return _hash({"seed": seed, "world_size": world_size, "data": data, "teacher": teacher})


def _hash(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


def _written_data(data: DataConfig) -> dict[str, Any]:
    return _identified(data.model_dump(mode="json", exclude=DATA_FIELDS_WITHOUT_EFFECT), "root_identity")


def _identified(values: dict[str, Any], field: str) -> dict[str, Any]:
    """A section's key fields with its input's identity where the driver read one; without the
    field where it did not (specs of data and weights with nothing to identify, and those stored
    before identities existed, keep their keys)."""
    if values.get(field) is None:
        values.pop(field, None)
    return values


def canonical_data(data: DataConfig) -> dict[str, Any]:
    """The data fields that show the teacher its pictures, one spelling per meaning: store_size
    is left at its default on the loader pipeline, which builds no store."""
    values = _written_data(data)
    if data.pipeline == "loader":
        values["store_size"] = _default(DataConfig, "store_size")
    return values


def canonical_teacher(teacher: TeacherConfig) -> dict[str, Any]:
    """The teacher section, one spelling per training: the saved epochs sorted and deduplicated
    (null is [epochs]); settings the training never reads at their defaults: reweight_mode at
    alpha 1 (no reweighting), adaptive and asam_eta at rho 0 (no perturbation), asam_eta
    without adaptive. Floats and ints are one already (pydantic), model_kwargs keys sorted by
    the hash, weights 'none' is None."""
    values = _identified(teacher.model_dump(mode="json"), "weights_identity")
    values["checkpoint_epochs"] = teacher.saved_epochs
    if teacher.alpha == 1.0:
        values["reweight_mode"] = _default(TeacherConfig, "reweight_mode")
    if teacher.rho == 0.0:
        values["adaptive"] = _default(TeacherConfig, "adaptive")
    if teacher.rho == 0.0 or not teacher.adaptive:
        values["asam_eta"] = _default(TeacherConfig, "asam_eta")
    return values


def canonical_student(student: StudentConfig) -> dict[str, Any]:
    """The student section, one spelling per distillation: without the teacher's choice (the key
    holds the teacher's own key and epoch); the cache's views and their seed at their defaults
    for online targets (no cache); the KD term's loss and temperature at their defaults when its
    weight is 0 (no KD gradient)."""
    values = _identified(
        student.model_dump(mode="json", exclude={"teacher_epoch", "teacher_checkpoint"}), "weights_identity"
    )
    if student.teacher_targets == "online":
        values["target_views"] = _default(StudentConfig, "target_views")
        values["target_view_seed"] = _default(StudentConfig, "target_view_seed")
    if student.kd.weight == 0.0:
        kd = {"loss": _default(KDConfig, "loss"), "temperature": _default(KDConfig, "temperature")}
        values["kd"] = {**values["kd"], **kd}
    return values


def _checkpoint_spellings(teacher: TeacherConfig) -> list[list[int] | None]:
    """checkpoint_epochs as written, sorted and deduplicated, and null where it means the same."""
    spellings: list[list[int] | None] = [teacher.checkpoint_epochs, teacher.saved_epochs]
    if teacher.saved_epochs == [teacher.epochs]:
        spellings.append(None)
    return spellings


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming the first bad field; pydantic's own text is multi-line. An unknown key of
    `model`'s tree comes with the known key it most looks like (a typo: `epochz`, `rhoo`)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "model_type":  # "... a valid dictionary or instance of ParamRange": our class names
        searched = first["loc"][:2] == ("sweep", "search") and len(first["loc"]) == 3
        msg = "should be {values: [...]} or {low: ..., high: ...}" if searched else "should be a mapping of its fields"
    if first["type"] == "extra_forbidden":
        known = _keys_beside(model, first["loc"]) if model is not None else []
        typed = str(first["loc"][-1])
        close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
        close = close or [k for k in known if len(typed) >= 4 and k.startswith(typed)][:1]  # grace: grace_period
        msg = f"unknown key; did you mean {close[0]}?" if close else "unknown key"
    more = len(err.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    text = f"{loc}: {msg}" if loc else msg
    return f"{text}{suffix}".replace("\n", " ")


def _keys_beside(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the section holding `loc`'s last key takes (none where the path leaves the tree of
    models: a search space's or a model's own kwargs)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # a list's item: the item's model, found below
            continue
        if not _is_model(current):
            return []
        field = current.model_fields.get(part)
        # a key of a section that takes any key (sweep.search's parameters): its values' model
        extra = typing.get_type_hints(current).get("__pydantic_extra__") if field is None else None
        if field is None and extra is None:
            return []
        current = _model_in(field.annotation if field is not None else extra)
    return list(current.model_fields) if _is_model(current) else []


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _model_in(annotation: Any) -> Any:
    """The model class an annotation holds (itself, or inside Optional[...], list[...]), if any."""
    if _is_model(annotation):
        return annotation
    return next((m for m in map(_model_in, typing.get_args(annotation)) if m is not None), None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping: YAML keeps the last one, so a
    second `sweep:` section silently replaced the first (and a second `name:` the intended name)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """safe_load a YAML mapping; python object tags and other unsafe constructs are refused."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"spec: {p} is a folder, not a spec file")
    if not p.exists():
        raise SpecError(f"spec: file not found: {p}")
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506  safe_load's loader, stricter
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"spec: invalid YAML{line} in {p}: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(f"spec: {p} is not UTF-8 text") from None
    if raw is None:  # a truncated or wrong file, more often than a wish for every default
        raise SpecError(
            f"spec: {p} is empty (no fields); name at least one field, or give no spec file "
            f"to `remem run` for the embedded default"
        )
    if not isinstance(raw, dict):
        raise SpecError(f"spec: {p} must hold a mapping of fields, not {type(raw).__name__}")
    return raw


def parse_spec(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, model)) from None


def load_run_spec(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Read a run spec; a sweep spec file works too (its `sweep` section is ignored here)."""
    raw = read_yaml(path) if path is not None else {}
    raw.pop("sweep", None)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_spec(RunSpec, raw)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError(f"{dotted}: cannot set inside a non-mapping")
    node[leaf] = value


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class FieldBounds:
    """The numeric bounds of a spec field (pydantic's ge/gt/le/lt)."""

    low: float = -math.inf
    low_open: bool = True
    high: float = math.inf
    high_open: bool = True

    def contains(self, low: float, high: float) -> bool:
        above = low > self.low if self.low_open else low >= self.low
        below = high < self.high if self.high_open else high <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def field_bounds(dotted: str, model: type[BaseModel] | None = None) -> FieldBounds:
    """The bounds declared on a run-spec field, e.g. field_bounds("teacher.rho") is [0, 10]."""
    node: Any = model or RunSpec
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.model_fields[part].annotation
    bounds = FieldBounds()
    for rule in node.model_fields[leaf].metadata:
        for attr, low, is_open in (("ge", True, False), ("gt", True, True), ("le", False, False), ("lt", False, True)):
            value = getattr(rule, attr, None)
            if value is not None:
                bounds = (
                    replace(bounds, low=value, low_open=is_open)
                    if low
                    else replace(bounds, high=value, high_open=is_open)
                )
    return bounds


class ParamRange(StrictModel):
    """A search dimension: a list of values, or a [low, high] range (log-uniform if log)."""

    values: list[float] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> ParamRange:
        has_range = self.low is not None or self.high is not None
        if (self.values is None) == (not has_range):
            raise ValueError("give either values: [...] or low and high")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        if has_range:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError("a range needs low < high")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        return self

    def contains(self, value: float) -> bool:
        low, high = self.bounds()
        return value in self.values if self.values is not None else low <= value <= high

    def bounds(self) -> tuple[float, float]:
        if self.values is not None:
            return min(self.values), max(self.values)
        assert self.low is not None and self.high is not None  # the validator makes one form complete
        return self.low, self.high


class SearchSpaceConfig(StrictModel):
    """sweep.search: a range or values per searched parameter (remem_ray.search_params lists them),
    and teacher_epoch, a choice among the saved epochs."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())
    __pydantic_extra__: dict[str, ParamRange]  # the ranged parameters, validated as ParamRange
    teacher_epoch: list[int] | None = Field(None, description="choice among saved epochs; default: all saved")

    @model_validator(mode="before")
    @classmethod
    def _known_with_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - set(SEARCH_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r} (searchable: {', '.join(SEARCH_PARAMS)})")
        defaults = {p.name: {"values": list(p.default)} for p in ranged_params() if p.default is not None}
        return {**defaults, **data}

    @model_validator(mode="after")
    def _within_field_bounds(self) -> SearchSpaceConfig:
        # the bounds of the run field each parameter sets: every sampled value is a valid run
        for name, dim in self.ranges().items():
            bounds = field_bounds(SEARCH_PARAMS[name].target)
            if not bounds.contains(*dim.bounds()):
                note = f" ({SEARCH_PARAMS[name].note})" if SEARCH_PARAMS[name].note else ""
                raise ValueError(f"{name}: values must lie in {bounds}{note}")
        return self

    def ranges(self) -> dict[str, ParamRange]:
        """The ranged parameters searched, in the registry's order."""
        extra = self.__pydantic_extra__ or {}
        return {p.name: extra[p.name] for p in ranged_params() if extra.get(p.name) is not None}


class AshaConfig(StrictModel):
    enabled: bool = True
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


AUTO: Literal["auto"] = "auto"
MAX_GPUS_PER_WORKER = 16


def _gpu_count(value: Any) -> float | Literal["auto"]:
    """A number of GPUs in [0, 16] or "auto" (one message for both, not pydantic's two for a union)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of GPUs or auto, got {value!r}")
    if not 0 <= value <= MAX_GPUS_PER_WORKER:
        raise ValueError(f"must lie in [0, {MAX_GPUS_PER_WORKER}], got {value}")
    return float(value)


GpuCount = Annotated[float | Literal["auto"], PlainValidator(_gpu_count)]


class WorkerResources(StrictModel):
    num_workers: int = Field(1, ge=1, le=1024)
    cpus_per_worker: float = Field(0.9, gt=0.0, le=512)
    gpus_per_worker: GpuCount = Field(
        0.0,
        description="GPUs (or a share of one) per Train worker; auto: the share of one GPU that the "
        "role's measured memory leaves room for, one GPU per worker of a multi-worker role "
        "(remem_ray/sweep/gpu_shares.py)",
    )

    def gpus(self) -> float:
        """GPUs per worker, once an `auto` has been resolved (sweep/gpu_shares.py does it)."""
        if self.gpus_per_worker == AUTO:
            raise ValueError("gpus_per_worker: auto is resolved by the sweep driver before it is used")
        return float(self.gpus_per_worker)


class ResourcesConfig(StrictModel):
    teacher: WorkerResources = Field(default_factory=WorkerResources)
    student: WorkerResources = Field(default_factory=WorkerResources)
    trial_cpus: float = Field(
        0.1, gt=0.0, le=64, description="CPU of each trial's driver (it only waits); none with driver_resource"
    )
    driver_resource: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="custom resource that places trial drivers (define it on on-demand nodes only, e.g. a head "
        "started with --num-cpus=0): they then ask for it alone, no CPU",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend for multi-worker runs; gloo for logical GPUs"
    )
    gpu_budget: int | None = Field(
        None,
        ge=1,
        description="GPUs the sweep may use at once; without max_concurrent_trials each Train run takes its role's "
        "GPUs of it (sweep/slots.py)",
    )

    def trial_resources(self) -> dict[str, float]:
        """What each trial's driver process asks Tune for. With a driver resource, a sliver of it
        and no CPU: the nodes that define it are kept for drivers, and a head started with
        --num-cpus=0 (Ray's advice for a large cluster; cluster/) has no CPU to give."""
        if self.driver_resource:
            return {"cpu": 0.0, self.driver_resource: 0.001}
        return {"cpu": self.trial_cpus}

    def gpus_per_trial(self) -> float:
        """GPUs a trial holds at its peak (teacher and student phases run one after the other)."""
        return max(r.num_workers * r.gpus() for r in (self.teacher, self.student))

    def one_run_for_both_phases(self) -> bool:
        """Whether a trial that trains its teacher distils in the same Train run: only when both
        phases take the same workers (an `auto` share counts as the same until it is sized)."""
        return self.teacher == self.student

    def auto_roles(self) -> list[str]:
        """The roles whose GPU share the sweep driver sizes (gpus_per_worker: auto)."""
        return [role for role in ("teacher", "student") if getattr(self, role).gpus_per_worker == AUTO]


MAX_NUM_SAMPLES = 10000
LEASE_STALE_AFTER_S = 60.0  # the default; remem_ray.sweep.registry holds leases to it
TEACHER_WAIT_TIMEOUT_S = 6 * 3600.0  # the default longest wait for another's teacher, student or targets


class SweepConfig(StrictModel):
    num_samples: int = Field(4, ge=1, le=MAX_NUM_SAMPLES)
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Train runs at once; default: each run weighed by its GPUs against gpu_budget; with "
        "gpus_per_worker auto, what the cluster's GPU nodes hold; else 2",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the Optuna TPE sampler")
    search: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    points_to_evaluate: list[dict[str, float]] = Field(
        default_factory=list, description="trials to run first, e.g. the vanilla baseline"
    )
    asha: AshaConfig = Field(default_factory=AshaConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_failures: int = Field(2, ge=0, le=100, description="retries of a failed trial / Train run")
    teacher_wait_timeout_s: float = Field(
        TEACHER_WAIT_TIMEOUT_S,
        gt=0,
        description="longest a trial waits for another's teacher or student, or for a Train run slot; a student run, "
        "for the teacher targets another run computes",
    )
    lease_stale_after_s: float = Field(
        LEASE_STALE_AFTER_S,
        ge=10.0,
        le=3600.0,
        description="a teacher's, student's or sweep driver's lease whose holder has not renewed it this long is "
        "taken over (the holder renews every 5 s; a holder that finds it lost stops writing); a Train run slot "
        "unrenewed this long is freed",
    )
    worker_start_timeout_s: float = Field(
        600.0, gt=0, description="longest a Train run's workers may take to start (a busy node starts them slowly)"
    )
    optuna_storage: OptunaUrl = Field(
        None,
        description="Optuna storage URL the study is kept in as the sweep runs (sqlite:///..., postgresql://...), "
        "under the sweep's name; default: optuna.db (SQLite) in the sweep folder",
    )


class SweepSpec(RunSpec):
    """A run spec plus the search over the teacher's fine-tuning; `name` names the sweep."""

    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _search_matches_run(self) -> SweepSpec:
        saved = self.teacher.saved_epochs
        for epoch in self.sweep.search.teacher_epoch or []:
            if epoch not in saved:
                raise ValueError(f"sweep.search.teacher_epoch: {epoch} is not a saved teacher epoch {saved}")
        ranges = self.sweep.search.ranges()
        for i, point in enumerate(self.sweep.points_to_evaluate):
            unknown = sorted(set(point) - set(SEARCH_PARAMS))
            if unknown:
                raise ValueError(f"sweep.points_to_evaluate.{i}: unknown parameter {unknown[0]!r}")
            for name, value in point.items():
                if SEARCH_PARAMS[name].saved_epoch:
                    if value not in self.teacher_epochs():
                        raise ValueError(
                            f"sweep.points_to_evaluate.{i}.{name}: {value:g} is not a searched "
                            f"teacher epoch {self.teacher_epochs()}"
                        )
                elif name not in ranges or not ranges[name].contains(value):
                    raise ValueError(f"sweep.points_to_evaluate.{i}.{name}: {value:g} is outside sweep.search.{name}")
        for role in ("teacher", "student"):
            gpus = getattr(self.sweep.resources, role).gpus_per_worker
            if gpus == AUTO and self.device == "cpu":
                raise ValueError(
                    f"sweep.resources.{role}.gpus_per_worker: auto sizes a share of a GPU, and device cpu uses none"
                )
            # Ray hides every GPU from a worker that asked for none: each Train run would fail
            if self.device == "cuda" and gpus == 0:
                raise ValueError(
                    f"sweep.resources.{role}.gpus_per_worker: device cuda needs GPUs for the {role}'s "
                    f"Train workers (e.g. 1, 0.5 for two runs on one GPU, or auto)"
                )
        return self

    def searches_reweighting(self) -> bool:
        """Whether some trial fine-tunes with alpha < 1 (its teacher must be a reweightable ViT)."""
        ranges = self.sweep.search.ranges()
        return "alpha" in ranges and ranges["alpha"].bounds()[0] < 1.0

    def max_concurrent_trials(self) -> int:
        """Train runs at once, counting each as one (sweep/slots.measure_of weighs them by their GPUs
        where a gpu_budget applies); the budget over a trial's peak GPUs where it gives none."""
        if self.sweep.max_concurrent_trials is not None:
            return self.sweep.max_concurrent_trials
        res = self.sweep.resources
        if res.gpu_budget and res.gpus_per_trial() > 0:
            return max(1, int(res.gpu_budget // res.gpus_per_trial()))
        return 2

    def teacher_epochs(self) -> list[int]:
        return sorted(self.sweep.search.teacher_epoch or self.teacher.saved_epochs)

    def run_spec(self, params: dict[str, Any]) -> RunSpec:
        """The run one trial performs: this spec with the trial's sampled parameters."""
        raw = self.model_dump(mode="json", exclude={"sweep"})
        for name, value in params.items():
            if name in SEARCH_PARAMS:  # Tune may add keys of its own
                _set_dotted(raw, SEARCH_PARAMS[name].target, SEARCH_PARAMS[name].cast(value))
        return RunSpec.model_validate(raw)

    def trial_keys(self, run_spec: RunSpec) -> tuple[str, str]:
        """The teacher and student registry keys of one trial's run, under this sweep's workers
        (a key names the world size it trains at)."""
        teacher, student = self.sweep.resources.teacher.num_workers, self.sweep.resources.student.num_workers
        return run_spec.teacher_key(teacher), run_spec.student_key(teacher, student)


def load_sweep_spec(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a sweep spec; without a path, the model defaults (a 4-trial sweep) with the overrides."""
    raw = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_spec(SweepSpec, raw)
