"""The bad-input corpus: each case exits 2 with one stderr line naming the field or resource,
no traceback, nothing written (in the working folder or the bucket) and no Ray started.

A case is a spec (YAML), the verbs that read it, and what the message must name. Words in
@CAPS@ are filled in per test: @ENDPOINT@ a moto S3 server, @AUTH_ENDPOINT@ one that checks
credentials, @DEAD@ a loopback port nobody listens on, @BUCKET@ a fresh empty bucket,
@MISSING@ a bucket that does not exist, @READONLY@ a folder this user cannot write.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from remem_ray.cli import main

TEACHER, DISTILL, RUN, SWEEP_RUN = ("teacher", "SPEC"), ("distill", "SPEC"), ("run", "SPEC"), ("sweep", "run", "SPEC")
RUN_VERBS = (TEACHER, RUN)
ALL_VERBS = (TEACHER, DISTILL, RUN, SWEEP_RUN)
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_ROOT = "storage:\n  root: s3://@BUCKET@/p\n  endpoint: @ENDPOINT@\n"
MISSING_ROOT = "storage:\n  root: s3://@MISSING@/p\n  endpoint: @ENDPOINT@\n"
# verbs on an existing sweep, and their flags
STATUS, BEST, REPORT = ("sweep", "status", "demo"), ("sweep", "best", "demo"), ("report", "demo")
BY_URI = (("sweep", "resume", "s3://bucket/p/sweeps/demo"), ("sweep", "status", "s3://bucket/p/sweeps/demo"))
UNKNOWN_SWEEP = (("sweep", "status", "nothing-here"), ("sweep", "resume", "nothing-here"))
S3_FLAGS = ("--storage", "s3://@BUCKET@/p", "--endpoint", "@ENDPOINT@")
S3_NOT_A_URL = ("--storage", "s3://bucket/p", "--endpoint", "127.0.0.1:9000")
EXPORT, SWEEP_EXPORT = ("export", "missing-ck", "--to", "out"), ("sweep", "export", "nothing-here", "--to", "out")


@dataclass(frozen=True)
class Bad:
    id: str
    spec: str | None  # YAML written to spec.yaml; None: the verbs take no spec
    expected: tuple[str, ...]  # each must appear in the message
    verbs: tuple[tuple[str, ...], ...] = RUN_VERBS
    flags: tuple[str, ...] = ()  # appended to every verb's arguments
    env: tuple[tuple[str, str], ...] = ()  # on top of an empty AWS credential chain
    file: str | None = None  # a file put in the working folder first (where a storage root goes)


def _bad(id, spec, *expected, **kw) -> Bad:
    return Bad(id, spec, expected, **kw)


CORPUS = [
    # ------------------------------------------------------------- the run spec's fields
    _bad("unknown-top-key", "foo: 1\n", "foo: unknown key"),
    _bad("unknown-nested-key", "teacher:\n  rhoo: 0.1\n", "teacher.rhoo: unknown key"),
    _bad("wrong-type", "teacher:\n  epochs: ten\n", "teacher.epochs"),
    _bad("negative-rho", "teacher:\n  rho: -0.01\n", "teacher.rho"),
    _bad("alpha-zero", "teacher:\n  alpha: 0\n", "teacher.alpha"),
    _bad("alpha-above-one", "teacher:\n  alpha: 1.5\n", "teacher.alpha"),
    _bad("checkpoint-epoch-zero", "teacher:\n  epochs: 5\n  checkpoint_epochs: [0, 5]\n", "checkpoint_epochs"),
    _bad("checkpoint-epoch-past-end", "teacher:\n  epochs: 5\n  checkpoint_epochs: [6]\n", "checkpoint_epochs"),
    _bad("unknown-teacher-model", "teacher:\n  model: vit_nonexistent_999\n", "teacher.model"),
    _bad("unknown-student-model", "student:\n  model: resnet_nonexistent\n", "student.model"),
    _bad("unknown-dataset", "data:\n  name: imagenet9\n", "data.name"),
    _bad("unknown-pipeline", "data:\n  pipeline: gpu\n", "data.pipeline"),
    _bad("negative-store-budget", "data:\n  store_budget_gb: -1\n", "data.store_budget_gb"),
    _bad("compile-not-a-switch", "compile: sometimes\n", "compile"),
    _bad("not-a-mapping", "- teacher\n- student\n", "must hold a mapping"),
    _bad("yaml-syntax", "teacher: [1, 2\n", "invalid YAML"),
    _bad("empty-file", "", "is empty", verbs=ALL_VERBS),
    _bad("only-comments", "# teacher:\n#   rho: 0.1\n", "is empty", verbs=ALL_VERBS),
    _bad("unsupported-scheme", "storage:\n  root: ftp://host/x\n", "storage.root"),
    _bad("endpoint-without-scheme", "storage:\n  root: s3://b/p\n  endpoint: 127.0.0.1:9000\n", "storage.endpoint"),
    _bad("region-with-spaces", "storage:\n  root: s3://b/p\n  region: us east 1\n", "storage.region: must look like"),
    _bad("reweight-non-vit", "teacher:\n  model: resnet18\n  alpha: 0.9\n", "teacher.alpha"),
    _bad("img-size-too-small", "data:\n  img_size: 4\n", "data.img_size"),
    # found by each trial's first batch (a traceback) or by each trial's data (exit 1), before
    _bad(
        "img-size-below-a-vit-patch",
        "teacher:\n  model: vit_tiny_patch16_224\n  model_kwargs: {depth: 1}\ndata:\n  img_size: 8\n",
        "data.img_size: teacher.model vit_tiny_patch16_224 cannot take 8-px images",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "imagefolder-root-missing",
        "data:\n  name: imagefolder\n  root: /nonexistent/images\n",
        "data.root: folder not found: /nonexistent/images",
        verbs=(TEACHER, RUN, SWEEP_RUN),
    ),
    _bad(
        "sweep-searches-reweighting-of-a-cnn",
        "teacher:\n  model: resnet18\n",
        "sweep.search.alpha: MLP reweighting",
        verbs=(SWEEP_RUN,),
    ),
    # found as every run built its model (timm: "No pretrained weights exist or were found")
    _bad(
        "timm-weights-for-an-architecture-without-any",
        "teacher:\n  weights: timm\n",
        "teacher.weights: timm has no weights for vit_micro_patch4",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "unknown-timm-tag",
        "student:\n  model: resnet18.no_such_tag\n  weights: timm\n",
        "student.model: resnet18.no_such_tag cannot be built: Invalid pretrained tag (no_such_tag)",
    ),
    _bad("missing-weights-file", "teacher:\n  weights: /nonexistent/w.pth\n", "teacher.weights"),
    _bad("data-root-unsupported-scheme", "data:\n  root: ftp://host/images\n", "data.root: unsupported scheme"),
    _bad("data-root-whole-bucket", "data:\n  name: imagefolder\n  root: s3://bucket\n", "data.root", "whole bucket"),
    _bad("warmup-infinite", "teacher:\n  schedule:\n    warmup_epochs: .inf\n", "teacher.schedule.warmup_epochs"),
    # a NaN passed every bound check: the message said 'less than or equal to 10'
    _bad("rho-nan", "teacher:\n  rho: .nan\n", "teacher.rho: Input should be a finite number"),
    _bad("zero-temperature", "student:\n  kd:\n    temperature: 0\n", "student.kd.temperature"),
    _bad("bad-name", "name: a/b\n", "name"),
    _bad("bad-model-kwargs", "teacher:\n  model_kwargs: {no_such_arg: 1}\n", "teacher.model_kwargs"),
    _bad("unknown-optimizer", "teacher:\n  optimizer:\n    name: lamb_nonexistent\n", "teacher.optimizer.name"),
    _bad("second-order-optimizer", "student:\n  optimizer:\n    name: adahessian\n", "student.optimizer.name"),
    _bad("imagefolder-without-root", "data:\n  name: imagefolder\n", "data.root"),
    _bad("kd-weight-above-one", "student:\n  kd:\n    weight: 1.2\n", "student.kd.weight"),
    # negative epochs
    _bad("negative-epochs", "student:\n  epochs: -3\n", "student.epochs"),
    _bad("negative-teacher-epochs", "teacher:\n  epochs: -1\n", "teacher.epochs"),
    _bad("sweep-negative-epochs", "student:\n  epochs: -2\n", "student.epochs", verbs=(SWEEP_RUN,)),
    # python object tags: safe_load refuses them before anything runs
    _bad("python-object-tag", "teacher: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    _bad("python-name-tag", "teacher:\n  model: !!python/name:os.system\n", "invalid YAML", verbs=(TEACHER, SWEEP_RUN)),
    _bad(
        "sweep-python-object-new",
        "sweep: !!python/object/new:os.system [echo pwned]\n",
        "invalid YAML",
        verbs=(SWEEP_RUN,),
    ),
    # '..' in paths
    _bad("parent-dir-in-storage", "storage:\n  root: ../elsewhere\n", "storage.root"),
    _bad("parent-dir-in-s3-root", "storage:\n  root: s3://bucket/a/../b\n", "storage.root"),
    _bad("parent-dir-in-data-root", "data:\n  root: data/../../secrets\n", "data.root"),
    # found as the run starts, after its TensorBoard folder was made (remem-results/runs/x/tensorboard/)
    _bad(
        "s3-weights-not-found",
        "name: x\nteacher:\n  weights: s3://@BUCKET@/models/nothere.pth\n",
        "teacher.weights: not found: s3://",
        verbs=RUN_VERBS,
        env=(("AWS_ENDPOINT_URL", "@ENDPOINT@"), *MOTO_KEYS.items()),
    ),
    _bad("parent-dir-in-s3-weights", "teacher:\n  weights: s3://bucket/models/../../w.pth\n", "teacher.weights"),
    _bad(
        "parent-dir-in-teacher-checkpoint",
        "student:\n  teacher_checkpoint: ../other/teacher/epoch_5\n",
        "student.teacher_checkpoint",
        verbs=(DISTILL, RUN),
    ),
    _bad(
        "parent-dir-in-storage-flag",
        "name: x\n",
        "storage.root",
        flags=("--storage", "../out"),
        verbs=(TEACHER, RUN, SWEEP_RUN),
    ),
    _bad("parent-dir-in-name-flag", "name: x\n", "name", flags=("--name", "../escape"), verbs=(TEACHER, SWEEP_RUN)),
    # a teacher_epoch that is not saved
    _bad("teacher-epoch-not-saved", "teacher:\n  epochs: 4\nstudent:\n  teacher_epoch: 2\n", "student.teacher_epoch"),
    # the epoch read 3.0, as the point's floats hold it
    _bad(
        "point-teacher-epoch-not-searched",
        "teacher:\n  epochs: 4\nsweep:\n  points_to_evaluate:\n    - {teacher_epoch: 3}\n",
        "sweep.points_to_evaluate.0.teacher_epoch: 3 is not a searched teacher epoch [4]",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "teacher-epoch-flag-not-saved",
        "teacher:\n  epochs: 4\n",
        "student.teacher_epoch",
        flags=("--teacher-epoch", "3"),
        verbs=(DISTILL, RUN),
    ),
    _bad(
        "sweep-teacher-epoch-not-saved",
        "teacher:\n  epochs: 4\n  checkpoint_epochs: [2, 4]\nsweep:\n  search:\n    teacher_epoch: [3]\n",
        "sweep.search.teacher_epoch",
        verbs=(SWEEP_RUN,),
    ),
    # the sweep section
    _bad(
        "sweep-cuda-without-gpus",
        "device: cuda\nsweep:\n  resources:\n    teacher: {gpus_per_worker: 1}\n",
        "sweep.resources.student.gpus_per_worker",
        "device cuda",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "sweep-gpus-neither-number-nor-auto",
        "sweep:\n  resources:\n    student: {gpus_per_worker: half}\n",
        "sweep.resources.student.gpus_per_worker",
        "a number of GPUs or auto",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "sweep-auto-gpus-on-cpu",
        "device: cpu\nsweep:\n  resources:\n    teacher: {gpus_per_worker: auto}\n",
        "sweep.resources.teacher.gpus_per_worker",
        "device cpu",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "sweep-num-samples-over-ceiling",
        "sweep:\n  num_samples: 10001\n",
        "sweep.num_samples",
        "10000",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "sweep-alpha-zero",
        "sweep:\n  search:\n    alpha:\n      values: [0, 0.9]\n",
        "sweep.search: alpha",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "sweep-point-alpha-zero",
        "sweep:\n  points_to_evaluate: [{alpha: 0}]\n",
        "sweep.points_to_evaluate.0.alpha",
        verbs=(SWEEP_RUN,),
    ),
    # storage: S3 endpoint, credentials, bucket
    _bad(
        "unreachable-endpoint",
        "storage:\n  root: s3://bucket/p\n  endpoint: @DEAD@\n",
        "storage.endpoint",
        "@DEAD@",
        verbs=ALL_VERBS,
    ),
    _bad(
        "unreachable-endpoint-from-env",
        "storage:\n  root: s3://bucket/p\n",
        "AWS_ENDPOINT_URL",
        "@DEAD@",
        env=(("AWS_ENDPOINT_URL", "@DEAD@"),),
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "unreachable-endpoint-from-s3-env",
        "storage:\n  root: s3://bucket/p\n",
        "AWS_ENDPOINT_URL_S3",
        "@DEAD@",
        env=(("AWS_ENDPOINT_URL_S3", "@DEAD@"),),
        verbs=(SWEEP_RUN,),
    ),
    _bad("missing-credentials", S3_ROOT, "storage.root", "no AWS credentials", "AWS_ACCESS_KEY_ID", verbs=ALL_VERBS),
    _bad(
        "missing-aws-profile",
        S3_ROOT,
        "storage.root",
        "no-such-profile",
        env=(("AWS_PROFILE", "no-such-profile"),),
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "missing-bucket",
        MISSING_ROOT,
        "storage.root",
        "@MISSING@",
        "does not exist",
        env=tuple(MOTO_KEYS.items()),
        verbs=ALL_VERBS,
    ),
    _bad(
        "wrong-credentials",
        "storage:\n  root: s3://@MISSING@/p\n  endpoint: @AUTH_ENDPOINT@\n",
        "storage.root",
        "access denied",
        env=tuple(MOTO_KEYS.items()),
        verbs=(TEACHER, SWEEP_RUN),
    ),
    # storage: a local root that cannot be a folder we write
    _bad(
        "storage-root-is-a-file",
        "storage:\n  root: occupied\n",
        "storage.root",
        "is a file",
        file="occupied",
        verbs=ALL_VERBS,
    ),
    _bad(
        "storage-root-under-a-file",
        "storage:\n  root: occupied/results\n",
        "storage.root",
        "occupied",
        file="occupied",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "storage-root-not-writable",
        "storage:\n  root: @READONLY@/results\n",
        "storage.root",
        "not writable",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    # verbs that find an existing sweep: the same checks on --storage / the sweep URI and --endpoint
    _bad(
        "status-missing-bucket",
        None,
        "--storage",
        "@MISSING@",
        "does not exist",
        verbs=(STATUS, BEST, REPORT),
        flags=("--storage", "s3://@MISSING@/p", "--endpoint", "@ENDPOINT@"),
        env=tuple(MOTO_KEYS.items()),
    ),
    # a fixed teacher would give every trial one student key: the first trial's student replayed by all
    _bad(
        "sweep-fixed-teacher-checkpoint",
        "student:\n  teacher_checkpoint: t\n",
        "student.teacher_checkpoint",
        verbs=(SWEEP_RUN,),
    ),
    # canonical_student drops the temperature at weight 0: one student replayed per temperature
    _bad(
        "kd-temperature-searched-without-kd",
        "student:\n  kd: {weight: 0.0}\nsweep:\n  search:\n    kd_temperature: {values: [2, 4]}\n",
        "sweep.search.kd_temperature: student.kd.weight is 0",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "gpu-budget-below-one-auto-trial",  # a multi-worker auto role takes a GPU per worker
        "sweep:\n  resources:\n    teacher: {num_workers: 4, gpus_per_worker: auto}\n    gpu_budget: 2\n",
        "sweep.resources.gpu_budget: 2 GPUs cannot hold one trial, which takes 4",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "gpu-budget-below-one-trial",
        "sweep:\n  resources:\n    teacher: {num_workers: 2, gpus_per_worker: 1}\n    gpu_budget: 1\n",
        "sweep.resources.gpu_budget",
        verbs=(SWEEP_RUN,),
    ),
    # an unset shell variable (`--storage "$ROOT"`) fell back to the default root
    _bad(
        "empty-storage-flag", "name: x\n", "--storage: empty value", flags=("--storage", ""), verbs=(TEACHER, SWEEP_RUN)
    ),
    _bad("empty-sweep-name", None, "NAME|URI: empty value", verbs=(("sweep", "status", ""), ("sweep", "resume", " "))),
    # set for `ray job` users: it named --address, which was never given
    _bad(
        "ray-address-is-a-dashboard-url",
        "name: x\n",
        "RAY_ADDRESS: expected HOST:PORT",
        "dashboard",
        verbs=(SWEEP_RUN,),
        env=(("RAY_ADDRESS", "http://127.0.0.1:8265"),),
    ),
    # timm's "multiple values for img_size" made the build fall back without data.img_size
    _bad(
        "model-kwargs-img-size",
        "teacher:\n  model_kwargs: {img_size: 48}\n",
        "teacher.model_kwargs.img_size: 48 where data.img_size gives",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad(
        "model-kwargs-in-chans",
        "student:\n  model_kwargs: {in_chans: 1}\n",
        "student.model_kwargs.in_chans",
        verbs=(RUN,),
    ),
    # sklearn's stratification error escaped as a traceback, in every Train worker of a sweep
    _bad(
        "data-too-few-images-for-its-classes",
        "data: {name: synthetic, num_classes: 20, max_train_samples: 10}\n",
        "data.max_train_samples: 10 images cannot hold one of each of the 20 classes",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    # refused only as each run built its data (in every trial of a sweep), naming a fraction
    _bad(
        "synthetic-too-few-images-per-class",
        "data: {name: synthetic, samples_per_class: 6}\n",
        "data.samples_per_class: 6 images of each of 10 classes cannot put one of each class in train, val and test",
        verbs=(TEACHER, SWEEP_RUN),
    ),
    _bad("info-samples-zero", "name: x\n", "--samples", verbs=(("info", "ck", "--data", "SPEC", "--samples", "0"),)),
    _bad(
        "distill-teacher-missing",
        "name: x\n",
        "student.teacher_checkpoint (--teacher): no complete checkpoint at",
        verbs=(("distill", "SPEC", "--teacher", "nothere"),),
    ),
    _bad(
        "distill-teacher-and-epoch",
        "name: x\n",
        "--teacher-epoch: give it or --teacher",
        verbs=(("distill", "SPEC", "--teacher", "nothere", "--teacher-epoch", "2"),),
    ),
    # it trained a whole teacher, then distilled from the other one (or failed on a missing one)
    _bad(
        "run-with-a-saved-teacher",
        "student:\n  teacher_checkpoint: nothere\n",
        "student.teacher_checkpoint: `remem run` distils from the teacher it trains",
        verbs=(RUN,),
    ),
    _bad("info-unknown-dataset", "data:\n  name: imagenet9\n", "data.name", verbs=(("info", "ck", "--data", "SPEC"),)),
    _bad("resume-unreachable-endpoint", None, "--endpoint", "@DEAD@", verbs=BY_URI, flags=("--endpoint", "@DEAD@")),
    _bad("status-endpoint-not-a-url", None, "--endpoint", "127.0.0.1:9000", verbs=(STATUS,), flags=S3_NOT_A_URL),
    _bad("status-unknown-sweep", None, "sweep: no sweep at", "nothing-here", verbs=UNKNOWN_SWEEP),
    _bad("best-missing-credentials", None, "--storage", "AWS_ACCESS_KEY_ID", verbs=(BEST,), flags=S3_FLAGS),
    # exports (tests/test_export.py and the smoke sweep test add those that need a checkpoint or a sweep)
    _bad("export-no-checkpoint", None, "no complete checkpoint", "missing-ck", verbs=(EXPORT,)),
    _bad("export-target-is-a-file", None, "--to", "is a file", verbs=(EXPORT,), file="out"),
    _bad("export-unknown-sweep", None, "sweep: no sweep at", "nothing-here", verbs=(SWEEP_EXPORT,)),
    # a review's probe: written under ./http:/x/y, exit 0
    _bad(
        "export-target-not-storage",
        None,
        "--to: http://x/y is neither a folder path nor an s3://bucket/prefix URI",
        verbs=(("export", "missing-ck", "--to", "http://x/y"),),
    ),
    # a review's probe: silent for 134 s of retries, then an error naming the sweep's storage
    _bad(
        "export-target-dead-endpoint",
        None,
        "cannot reach the S3 endpoint @DEAD@ (--endpoint)",
        verbs=(("export", "missing-ck", "--to", "s3://b/out"),),
        flags=("--endpoint", "@DEAD@"),
    ),
    _bad(
        "sweep-uri-not-storage",
        None,
        "sweep: http://host/x is neither a sweep's name, its folder's path nor an s3:// URI",
        verbs=(("sweep", "status", "http://host/x"), ("sweep", "best", "http://host/x")),
    ),
    _bad("empty-job-id", None, "JOB: empty value", verbs=(("sweep", "logs", "", "--address", "http://127.0.0.1:9"),)),
    # YAML keeps a key's last value: a second sweep section replaced the first in silence
    _bad("duplicate-key", "name: a\nseed: 1\nname: b\n", "key 'name' given twice (lines 1 and 3)"),
    _bad(
        "search-param-as-list",
        "sweep:\n  search:\n    rho: [0.0, 0.05]\n",
        "sweep.search.rho: should be {values: [...]} or {low: ..., high: ...}",
        verbs=(SWEEP_RUN,),
    ),
    _bad(
        "export-missing-bucket",
        None,
        "CHECKPOINT",
        "@MISSING@",
        "does not exist",
        verbs=(("export",),),
        flags=("s3://@MISSING@/ck", "--to", "out", "--endpoint", "@ENDPOINT@"),
        env=tuple(MOTO_KEYS.items()),
    ),
]


class Scene:
    """Fills a case's @WORDS@ in, creating only the servers and buckets it names."""

    def __init__(self, request, tmp_path_factory) -> None:
        self.request, self.tmp_path_factory = request, tmp_path_factory
        self.values: dict[str, str] = {}
        self.client = None

    def fill(self, text: str) -> str:
        for word in ("ENDPOINT", "AUTH_ENDPOINT", "DEAD", "BUCKET", "MISSING", "READONLY"):
            if f"@{word}@" in text:
                text = text.replace(f"@{word}@", self._value(word))
        return text

    def _value(self, word: str) -> str:
        if word not in self.values:
            self.values[word] = getattr(self, f"_make_{word.lower()}")()
        return self.values[word]

    def _make_endpoint(self) -> str:
        import boto3

        endpoint = self.request.getfixturevalue("moto_endpoint")
        # explicit keys: the test's own environment has none
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        return endpoint

    def _make_auth_endpoint(self) -> str:
        return self.request.getfixturevalue("moto_auth_endpoint")

    def _make_dead(self) -> str:
        return self.request.getfixturevalue("dead_endpoint")

    def _make_bucket(self) -> str:
        self._value("ENDPOINT")
        bucket = f"bad-input-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def _make_missing(self) -> str:
        return f"missing-{uuid.uuid4().hex[:8]}"

    def _make_readonly(self) -> str:
        folder = self.tmp_path_factory.mktemp("read-only")
        folder.chmod(0o555)
        if not os.access(folder, os.W_OK):
            return str(folder)
        if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):  # root ignores modes
            return "/proc/sys"
        pytest.skip("no folder this user cannot write")

    def buckets(self) -> set[str]:
        return {b["Name"] for b in self.client.list_buckets()["Buckets"]} if self.client else set()

    def assert_nothing_written_to_s3(self, buckets_before: set[str]) -> None:
        if self.client is None:
            return
        assert self.buckets() == buckets_before, "a bucket was created"
        if "BUCKET" in self.values:
            assert self.client.list_objects_v2(Bucket=self.values["BUCKET"]).get("KeyCount", 0) == 0


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started for bad input")


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input_exits_2_with_one_line_and_leaves_no_trace(
    case, in_tmp, request, tmp_path_factory, monkeypatch, capsys
):
    request.getfixturevalue("no_aws_credentials")
    monkeypatch.setattr("remem_ray.sweep.driver.ray_session", _no_ray)
    ray_was_imported = "ray" in sys.modules
    scene = Scene(request, tmp_path_factory)
    if case.spec is not None:
        (in_tmp / "spec.yaml").write_text(scene.fill(case.spec))
    if case.file:
        (in_tmp / case.file).write_text("not a folder")
    flags = [scene.fill(f) for f in case.flags]
    expected = [scene.fill(e) for e in case.expected]
    listing = sorted(p.name for p in in_tmp.iterdir())
    buckets = scene.buckets()
    for name, value in case.env:  # last: the scene's own S3 client must not see the case's settings
        monkeypatch.setenv(name, scene.fill(value))

    for verb in case.verbs:
        argv = [a if a != "SPEC" else "spec.yaml" for a in verb] + flags
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("remem: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err
        for text in expected:
            assert text in err, (argv, err)

    assert sorted(p.name for p in in_tmp.iterdir()) == listing
    scene.assert_nothing_written_to_s3(buckets)
    assert ray_was_imported or "ray" not in sys.modules, "bad input imported Ray"
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--teacher-epoch", "x"], "argument --teacher-epoch: invalid int value: 'x' (see `remem run --help`)"),
        (["sweep", "dashboard", "s", "--port", "abc"], "argument --port: invalid int value: 'abc'"),
        (["run", "--teacher", "ck"], "unrecognized arguments: --teacher;"),  # not --teacher-epoch ck
        (["frob"], "argument VERB: invalid choice: 'frob'"),
        # named `remem --help`, with no word of the flag meant
        (["sweep", "run", "s.yaml", "--nme", "x"], "--nme x; did you mean --name? (see `remem sweep run --help`)"),
    ],
)
def test_bad_arguments_get_one_line_too(argv, expected, capsys):
    """argparse printed its usage (two or three lines) before the error."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("remem: error: ") and err.count("\n") == 1, err
    assert expected in err


@pytest.mark.parametrize("spec, expected", [("folder", "is a folder, not a spec file"), ("/dev/null", "is empty")])
def test_a_spec_that_is_no_file_of_fields_says_what_it_is(spec, expected, in_tmp, capsys):
    """A folder was 'file not found'; /dev/null too."""
    (in_tmp / "folder").mkdir()
    assert main(["sweep", "run", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"remem: error: spec: {spec} ") and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("verb", ["logs", "stop"])
def test_a_job_verb_reaches_the_dashboard_it_is_given_over_an_exported_gcs_address(
    verb, dead_endpoint, monkeypatch, capsys
):
    """Ray's job client takes RAY_ADDRESS over the address it is given: with a GCS address
    exported (as for ray.init), `sweep logs JOB --address http://HEAD:8265` waited 40 s on that
    GCS, printed three lines of Ray's C++ warnings, then a GCS timeout (failed before)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert main(["sweep", verb, "abc", "--address", dead_endpoint]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"remem: error: --address: cannot reach the Ray dashboard at {dead_endpoint}: ")
    assert err.count("\n") == 1 and os.environ["RAY_ADDRESS"] == "127.0.0.1:9"  # given back


def test_corpus_covers_every_kind_of_bad_input():
    ids = {c.id for c in CORPUS}
    assert len(ids) == len(CORPUS) >= 30
    for required in (
        "python-object-tag",
        "unreachable-endpoint",
        "missing-credentials",
        "missing-bucket",
        "parent-dir-in-storage",
        "sweep-num-samples-over-ceiling",
        "alpha-zero",
        "negative-epochs",
        "teacher-epoch-not-saved",
    ):
        assert required in ids


# runs the CLI, then says whether Ray got imported on the way
_PROBE = (
    "import sys; from remem_ray.cli import main; rc = main(sys.argv[1:]); print('ray' in sys.modules); sys.exit(rc)"
)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("sweep:\n  num_samples: 10001\n", "sweep.num_samples"),
        # the preflight's one TCP connect (3 s timeout) answers, not pyarrow's minute of S3 retries:
        # its own message shows which path failed, whatever the machine's speed
        ("storage:\n  root: s3://bucket/p\n  endpoint: @DEAD@\n", "cannot reach the S3 endpoint"),
    ],
    ids=["sweep-over-ceiling", "sweep-dead-endpoint"],
)
def test_a_fresh_process_fails_fast_without_importing_ray(spec, expected, in_tmp, dead_endpoint, no_aws_credentials):
    (in_tmp / "spec.yaml").write_text(spec.replace("@DEAD@", dead_endpoint))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "sweep", "run", "spec.yaml"],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        env=os.environ.copy(),
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("remem: error: "), proc.stderr
    assert expected in proc.stderr
    assert proc.stdout.strip() == "False"  # Ray was never imported, let alone started
    assert sorted(p.name for p in in_tmp.iterdir()) == ["spec.yaml"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_tracebacks_behind_the_one_line(how, in_tmp, capsys, monkeypatch):
    (in_tmp / "bad.yaml").write_text("teacher:\n  model_kwargs: {depth: [1]}\n")
    args = ["teacher", "bad.yaml"]
    assert main(args) == 2
    plain = capsys.readouterr().err
    assert plain.count("\n") == 1 and "Traceback" not in plain
    if how == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("REMEM_DEBUG", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(plain)  # the same line first
    # the error's own traceback, then timm's error behind it (the spec check's build on the meta device)
    assert err.count("Traceback (most recent call last)") == 2 and "behind it:" in err
    assert "TypeError: 'list' object cannot be interpreted as an integer" in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml"]
