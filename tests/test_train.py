import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from remem_ray.checkpoint_files import best_checkpoint
from remem_ray.checkpoints import load_model, write_checkpoint
from remem_ray.cli import main
from remem_ray.config import RunSpec, load_run_spec
from remem_ray.runs import run_folder, run_student, run_teacher
from remem_ray.storage import Storage
from remem_ray.train.session import in_ray_train_worker

TINY = {
    "data.name": "synthetic",
    "data.num_classes": 4,
    "data.samples_per_class": 30,
    "teacher.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    "teacher.epochs": 2,
    "teacher.checkpoint_epochs": [1, 2],
    "student.epochs": 2,
    "student.model": "resnet10t",
}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """ReMem settings (rho 0.05, alpha 0.9) on the embedded digits default, trained once; seeded."""
    root = tmp_path_factory.mktemp("digits")
    spec = load_run_spec(
        None,
        {"name": "learn", "seed": 0, "teacher.rho": 0.05, "teacher.alpha": 0.9, "storage.root": str(root / "results")},
    )
    return spec, run_teacher(spec, quiet=True)


@pytest.fixture(scope="module")
def digits_online_student(digits_teacher):
    return run_student(digits_teacher[0], quiet=True)


@pytest.mark.learning
def test_teacher_and_student_learn_on_digits(digits_teacher, digits_online_student, record_property):
    spec, teacher = digits_teacher
    student = digits_online_student
    assert spec.data.name == "digits" and spec.teacher.model == "vit_micro_patch4"
    teacher_val = teacher["history"][-1]["val_acc"]
    student_val = student["best"]["val_acc"]
    record_property(  # shown at the end of the run (tests/conftest.py), under pytest-xdist too
        "learning",
        f"[learning] digits teacher {spec.teacher.model} (rho {spec.teacher.rho}, alpha "
        f"{spec.teacher.alpha}): val {teacher_val:.3f} test {teacher['history'][-1]['test_acc']:.3f}; "
        f"student {spec.student.model}: val {student_val:.3f} test {student['best']['test_acc']:.3f}",
    )
    assert teacher["history"][0]["val_acc"] < 0.5  # from scratch: it really had to learn
    assert teacher_val >= 0.80
    assert student_val >= 0.85
    loaded, meta = load_model(run_folder(spec).child("teacher"), "epoch_20")
    assert meta["reweighting"] == {"alpha": 0.9, "mode": "remem"}
    assert meta["class_names"] == [str(d) for d in range(10)]  # what an export's outputs mean
    assert meta["metrics"]["val_acc"] == pytest.approx(teacher_val)
    curve = json.loads((Path(run_folder(spec).uri("teacher")) / "history.json").read_text())
    assert [h["epoch"] for h in curve] == list(range(1, 21))
    assert curve[-1]["loop_seconds"] == pytest.approx(sum(h["epoch_seconds"] for h in curve))


@pytest.mark.learning
def test_cached_targets_distil_as_well_as_online_and_follow_the_checkpoint(
    digits_teacher, digits_online_student, record_property
):
    spec, _ = digits_teacher
    cached_spec = RunSpec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "student": {**spec.student.model_dump(mode="json"), "teacher_targets": "cached", "target_views": 8},
        }
    )
    online, cached = digits_online_student, run_student(cached_spec, quiet=True)
    record_property(  # shown at the end of the run (tests/conftest.py), under pytest-xdist too
        "learning",
        f"[learning] digits student, same seeds: online targets val {online['best']['val_acc']:.3f} "
        f"test {online['best']['test_acc']:.3f}; cached (8 views) val {cached['best']['val_acc']:.3f} "
        f"test {cached['best']['test_acc']:.3f}",
    )
    assert cached["history"][-1]["target_cache_built"] == 1
    # within noise: 0.03 is about 6 of the 216 val / 360 test images
    assert cached["best"]["val_acc"] == pytest.approx(online["best"]["val_acc"], abs=0.03)
    assert cached["best"]["test_acc"] == pytest.approx(online["best"]["test_acc"], abs=0.03)

    teacher_dir = run_folder(spec).child("teacher")
    one_epoch = RunSpec.model_validate(
        {**cached_spec.model_dump(mode="json"), "student": {**cached_spec.student.model_dump(mode="json"), "epochs": 1}}
    )
    assert run_student(one_epoch, quiet=True)["history"][-1]["target_cache_built"] == 0  # reused
    # A changed checkpoint (same place, other weights) must not be served the old targets.
    model, meta = load_model(teacher_dir, "epoch_20")
    with torch.no_grad():
        model.head.weight.mul_(-1.0)
    write_checkpoint(teacher_dir, "epoch_20", model, meta)
    assert run_student(one_epoch, quiet=True)["history"][-1]["target_cache_built"] == 1
    caches = sorted(p.name for p in (Path(teacher_dir.uri()) / "targets").glob("*.pt"))  # beside them: leases
    assert len(caches) == 2 and all(n.startswith("epoch_20-") for n in caches)


@pytest.mark.learning
def test_device_pipeline_run_learns_as_well_as_the_loader_path(digits_teacher, digits_online_student, record_property):
    """The whole `remem run` (teacher, then student) on digits with data.pipeline: device, same seeds."""
    spec, loader_teacher = digits_teacher
    device_spec = RunSpec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "name": "learn-device",
            "data": {**spec.data.model_dump(mode="json"), "pipeline": "device"},
        }
    )
    teacher = run_teacher(device_spec, quiet=True)
    student = run_student(device_spec, quiet=True)
    loader_val, device_val = loader_teacher["history"][-1]["val_acc"], teacher["history"][-1]["val_acc"]
    record_property(  # shown at the end of the run (tests/conftest.py), under pytest-xdist too
        "learning",
        f"[learning] digits, same seeds: loader pipeline teacher val {loader_val:.3f}, student val "
        f"{digits_online_student['best']['val_acc']:.3f} test {digits_online_student['best']['test_acc']:.3f}; "
        f"device pipeline teacher val {device_val:.3f}, student val {student['best']['val_acc']:.3f} "
        f"test {student['best']['test_acc']:.3f}",
    )
    # within noise: two runs that differ in their augmentation draws differ by the binomial noise of
    # 216 val / 360 test images (sd of a difference about 0.021 / 0.016 at 95 %), plus the teacher's
    # own; 0.05 is under 2.5 sd on val and 3 sd on test (measured gaps: 0.004-0.04)
    assert device_val == pytest.approx(loader_val, abs=0.05)
    assert student["best"]["val_acc"] == pytest.approx(digits_online_student["best"]["val_acc"], abs=0.05)
    assert student["best"]["test_acc"] == pytest.approx(digits_online_student["best"]["test_acc"], abs=0.05)
    for h in teacher["history"] + student["history"]:
        assert h["images_per_s"] > 0 and 0.0 <= h["data_wait_share"] <= 1.0


def _tiny_spec_file(folder: Path, name: str, teacher: dict, **sections) -> Path:
    """A spec file of a 2-epoch micro ViT teacher on synthetic data, `teacher` merged in."""
    spec = folder / "spec.yaml"
    tiny_teacher = {
        "epochs": 2,
        "checkpoint_epochs": [1, 2],
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    }
    data = {"name": "synthetic", "num_classes": 4, "samples_per_class": 30}
    spec.write_text(json.dumps({"name": name, "data": data, "teacher": {**tiny_teacher, **teacher}, **sections}))
    return spec


def test_cli_run_writes_checkpoints_and_distils_from_chosen_epoch(in_tmp, capsys):
    spec = _tiny_spec_file(in_tmp, "tiny", {"alpha": 0.8}, student={"epochs": 1})
    assert main(["run", str(spec), "--teacher-epoch", "1"]) == 0
    out = capsys.readouterr()
    # the teacher the student learnt from (it printed the last epoch's, whichever was chosen)
    assert "teacher epoch 1 (the student's): val_acc" in out.out and "student: best val_acc" in out.out
    assert "teacher: epoch 2" in out.err and "val_acc" in out.err  # progress lines
    run = in_tmp / "remem-results" / "runs" / "tiny"
    for epoch in (1, 2):
        assert (run / "teacher" / f"epoch_{epoch}" / "manifest.json").is_file()
    saved = json.loads((run / "teacher" / "spec.json").read_text())
    assert saved["spec"]["teacher"]["alpha"] == 0.8 and len(saved["teacher_key"]) == 16
    meta = json.loads((Path(best_checkpoint(Storage(str(run / "student")))) / "meta.json").read_text())
    assert meta["teacher"]["epoch"] == 1
    info = meta["teacher"]["information"]  # the teacher's MI, recorded at its checkpoint
    assert set(info) == {"targets/fixed", "targets/relative", "logits/fixed", "logits/relative"}
    assert 0.0 <= info["targets/relative"]["i_xt_lower"] <= info["targets/relative"]["i_xt_upper"]
    assert meta["teacher"]["metrics"]["teacher_mi"] == info["targets/fixed"]["i_xt_upper"]

    assert main(["distill", str(spec), "--teacher-epoch", "2"]) == 0
    meta = json.loads((Path(best_checkpoint(Storage(str(run / "student")))) / "meta.json").read_text())
    assert meta["teacher"]["epoch"] == 2

    capsys.readouterr()
    assert main(["info", str(run / "teacher" / "epoch_2"), "--data", str(spec), "--samples", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epoch"] == 2 and report["reweighting"] == {"alpha": 0.8, "mode": "remem"}
    assert report["samples"] == 15  # the whole val split: 15 % of the 96 non-test synthetic images
    assert len(report["expertness_by_block"]) == 2  # one score per ViT block
    assert all(0.0 < e <= 1.0 for e in report["expertness_by_block"])
    mi = report["mutual_information"]["targets/relative"]
    assert 0.0 <= mi["i_xt_lower"] <= mi["i_xt_upper"] <= math.log(15) + 1e-9
    assert main(["info", str(run / "teacher" / "epoch_9"), "--data", str(spec)]) == 2
    # data at another size than the checkpoint's: one line (a ViT failed with a traceback at its first forward)
    other = in_tmp / "other-size.yaml"
    raw = json.loads(spec.read_text())
    other.write_text(json.dumps({**raw, "data": {**raw["data"], "img_size": 48}}))
    capsys.readouterr()
    assert main(["info", str(run / "teacher" / "epoch_2"), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("remem: error: data.img_size: the checkpoint was trained at 16 px, the data spec says 48")
        and err.count("\n") == 1
    )


def test_teacher_mi_is_measured_at_the_reference_temperature_whatever_the_kd_temperature(tmp_path):
    """A teacher shared by trials that search kd.temperature gets one MI."""
    mis, metas = [], []
    for temperature in (1.0, 8.0):
        spec = load_run_spec(
            None,
            {
                **TINY,
                "teacher.epochs": 1,
                "teacher.checkpoint_epochs": [1],
                "student.kd.temperature": temperature,
                "name": f"t{temperature:g}",
                "storage.root": str(tmp_path),
            },
        )
        assert (
            spec.teacher_key()
            == load_run_spec(None, {**TINY, "teacher.epochs": 1, "teacher.checkpoint_epochs": [1]}).teacher_key()
        )
        mis.append(run_teacher(spec, quiet=True)["history"][-1]["teacher_mi"])
        metas.append(json.loads((tmp_path / "runs" / spec.name / "teacher" / "epoch_1" / "meta.json").read_text()))
    assert mis[0] == mis[1]
    assert [m.get("mi_temperature") for m in metas] == [4.0, 4.0]


def test_weight_decay_spares_biases_norms_and_tokens_as_timm_and_deit_do():
    """The fine-tuning recipe: decay on weight matrices only."""
    from remem_ray.config import OptimizerConfig
    from remem_ray.models import create_model
    from remem_ray.train.common import build_optimizer, build_sam

    model = create_model("vit_micro_patch4", 10, 16, {"class_token": True, "global_pool": "token"})
    names = {id(p): n for n, p in model.named_parameters()}
    assert "cls_token" in names.values()
    for optimizer in (
        build_sam(model, OptimizerConfig(weight_decay=0.05), 0.05, False).base_optimizer,
        build_optimizer(model, OptimizerConfig(weight_decay=0.05)),
    ):
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert decayed | spared == set(names.values()) and not decayed & spared
        assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= spared
        assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"} <= decayed
        assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "momentum", "lamb"])
def test_optimisers_torch_can_fuse_update_fused_and_step_as_the_default_implementation(name):
    """One fused kernel for all tensors where torch has one (Adam, AdamW, SGD): on CPU AdamW's
    step over resnet10t took 62 ms in torch's default implementation and 10 ms fused, more than
    the student's forward pass at 16 px. The update is the same: a few steps agree with the
    default implementation's; other optimisers are built as before."""
    from timm.optim import get_optimizer_class

    from remem_ray.config import OptimizerConfig
    from remem_ray.models import create_model
    from remem_ray.train.common import build_optimizer, build_sam, decay_groups, fuses

    cfg = OptimizerConfig(name=name, lr=0.01)
    torch.manual_seed(0)
    models = [create_model("resnet10t", 10, 16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    built = build_optimizer(models[0], cfg)
    cls = get_optimizer_class(name)
    kwargs = {"momentum": cfg.momentum} if "momentum" in built.defaults else {}
    default = cls(decay_groups(models[1], cfg.weight_decay), lr=cfg.lr, **kwargs)
    assert bool(built.defaults.get("fused")) == (name != "lamb") and not default.defaults.get("fused")
    assert bool(build_sam(models[0], cfg, 0.05, False).base_optimizer.defaults.get("fused")) == (name != "lamb")
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, optimizer in zip(models, (built, default)):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # within 1 % of one step (lr 0.01): the two implementations round differently, and Adam's
    # normalised update magnifies that where a gradient is tiny; a wrong setting moves by a step
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-4)
    assert not fuses(cls, create_model("resnet10t", 10, 16).to("meta"))  # a device without fused kernels


@pytest.mark.parametrize("wrapped", ["plain", "sam"])
def test_a_state_saved_unfused_resumes_fused(wrapped):
    """torch's load_state_dict takes each group's settings from the saved state: a teacher or
    student resumed from a state saved before updates were fused stepped unfused from then on.
    Failed before (plain load_state_dict): fused None after the load."""
    from remem_ray.config import OptimizerConfig
    from remem_ray.models import create_model
    from remem_ray.train.common import build_optimizer, build_sam, decay_groups, load_optimizer_state

    model = create_model("resnet10t", 10, 16)
    cfg = OptimizerConfig()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    old = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)  # as runs saved it until now
    F.cross_entropy(model(x), y).backward()
    old.step()
    saved = old.state_dict()
    assert all(g["fused"] is None for g in saved["param_groups"])
    built = build_optimizer(model, cfg) if wrapped == "plain" else build_sam(model, cfg, 0.05, False)
    load_optimizer_state(built, saved)
    base = built if wrapped == "plain" else built.base_optimizer
    assert all(g["fused"] is True for g in base.param_groups)
    steps = [s["step"] for s in base.state.values()]
    assert steps and all(t.dtype == torch.float32 and float(t) == 1.0 for t in steps)  # its state came along
    base.step()  # the fused kernel takes the loaded state
    assert all(float(s["step"]) == 2.0 for s in base.state.values())


def test_distill_without_teacher_exits_2(in_tmp, capsys):
    assert main(["distill", "--name", "never-trained"]) == 2
    err = capsys.readouterr().err
    assert "student.teacher_epoch: no teacher checkpoint" in err and err.count("\n") == 1
    assert not (in_tmp / "remem-results" / "runs" / "never-trained" / "student").exists()


def test_rho_zero_trains_with_one_pass_and_differs_from_sam(in_tmp):
    results = {}
    for rho in (0.0, 0.5):
        spec = load_run_spec(
            None,
            {
                **TINY,
                "name": f"rho{rho}",
                "teacher.rho": rho,
                "teacher.epochs": 1,
                "teacher.checkpoint_epochs": [1],
                "storage.root": str(in_tmp),
            },
        )
        run_teacher(spec, quiet=True)
        model, _ = load_model(run_folder(spec).child("teacher"), "epoch_1")
        results[rho] = torch.cat([p.flatten() for p in model.parameters()])
    assert not torch.allclose(results[0.0], results[0.5])


def test_a_diverged_teacher_stops_before_its_epoch_is_kept_with_one_line_and_exit_1(in_tmp, capsys):
    """SAM at rho 10 with SGD at lr 10 diverges in epoch 2 (its weights NaN, seeded). Before, the
    run went on: a NaN checkpoint passed for a chance-level teacher (argmax of NaN is class 0), was
    saved, and students distilled from it."""
    spec = _tiny_spec_file(in_tmp, "diverges", {"rho": 10.0, "optimizer": {"name": "sgd", "lr": 10.0}})
    assert main(["teacher", str(spec)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("remem: teacher diverged in epoch 2 (")
        and "lower teacher.optimizer.lr or teacher.rho" in err[-1]
    )
    teacher = in_tmp / "remem-results" / "runs" / "diverges" / "teacher"
    assert (teacher / "epoch_1" / "manifest.json").is_file() and not (teacher / "epoch_2").exists()
    assert "Traceback" not in "\n".join(err)


def test_in_process_is_not_a_ray_train_worker():
    assert not in_ray_train_worker()


def test_per_step_schedule_warms_up_decays_to_the_floor_and_resumes_where_it_stopped():
    from remem_ray.config import ScheduleConfig
    from remem_ray.train.common import PerStepSchedule

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, PerStepSchedule(opt, ScheduleConfig(warmup_epochs=1.0, min_lr_ratio=0.01), 4, 5)

    opt, schedule = fresh()
    lrs = [schedule.get_last_lr()[0]]
    for _ in range(20):
        opt.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert 0 < lrs[0] < lrs[1] < lrs[4] < lrs[5] == pytest.approx(0.1)  # 5 warmup steps, non-zero from the first
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # then cosine down...
    assert lrs[20] == pytest.approx(0.001)  # ...to min_lr_ratio at the last step

    opt2, resumed = fresh()
    resumed.load_state_dict(fresh_state := _schedule_after(7))
    assert fresh_state["updates"] == 7 and resumed.get_last_lr()[0] == pytest.approx(lrs[7])
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[8])


def _schedule_after(steps: int) -> dict:
    from remem_ray.config import ScheduleConfig
    from remem_ray.train.common import PerStepSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = PerStepSchedule(opt, ScheduleConfig(warmup_epochs=1.0, min_lr_ratio=0.01), 4, 5)
    for _ in range(steps):
        schedule.step()
    return schedule.state_dict()


def test_a_student_starts_from_the_same_weights_whether_its_targets_are_built_loaded_or_online(tmp_path):
    """Initial weights are a function of (seed, role): building the target cache (which draws
    views) must not move them."""
    from remem_ray.contract import LoopConfig
    from remem_ray.train.loop import prepare
    from remem_ray.train.student import StudentTask

    overrides = {**TINY, "teacher.epochs": 1, "teacher.checkpoint_epochs": [1], "data.pipeline": "loader"}
    overrides.update({"student.target_views": 2, "storage.root": str(tmp_path), "name": "init"})
    teacher = load_run_spec(None, overrides)
    run_teacher(teacher, quiet=True)
    location = run_folder(teacher).child("teacher").uri("epoch_1")

    def initial(targets: str) -> tuple[dict, int | None]:
        spec = load_run_spec(None, {**overrides, "student.teacher_targets": targets})
        ctx = prepare(LoopConfig(spec, str(tmp_path / f"student-{targets}"), quiet=True), "student")
        task = StudentTask(ctx, location)
        return task.bare.state_dict(), ctx.report_extra.get("target_cache_built")

    (built, was_built), (loaded, was_loaded), (online, _) = initial("cached"), initial("cached"), initial("online")
    assert (was_built, was_loaded) == (1, 0)
    for name, tensor in built.items():
        assert torch.equal(tensor, loaded[name]) and torch.equal(tensor, online[name]), name


def test_a_storage_outage_while_copying_an_earlier_holders_checkpoints_keeps_the_resume_state(tmp_path):
    """A teacher resuming from an earlier holder's state copies that holder's checkpoints first. One
    read failing on a storage outage made it give the state up and train from epoch 1 (hours of a
    big ViT); only a missing or corrupt checkpoint may. Failed before: begin() returned None."""
    from types import SimpleNamespace

    from remem_ray.checkpoint_files import checkpoint_name, write_checkpoint_files
    from remem_ray.errors import ResourceError
    from remem_ray.storage import Storage
    from remem_ray.train.teacher import TeacherTask

    class Unreachable(Storage):
        def read_bytes(self, rel):
            raise ResourceError(f"storage: cannot read {self.uri(rel)}: connection timed out")

    earlier = Unreachable(str(tmp_path / "gen-1"))
    for epoch in (1, 2):
        write_checkpoint_files(earlier, checkpoint_name(epoch), {"model.pt": b"w%d" % epoch})
    task = TeacherTask.__new__(TeacherTask)
    task.cfg = SimpleNamespace(saved_epochs=[1, 2, 4])
    logged = []
    ctx = SimpleNamespace(
        is_writer=True,
        device=torch.device("cpu"),
        output=Storage(str(tmp_path / "gen-2")),
        earlier_output=earlier,
        session=SimpleNamespace(log=logged.append),
    )
    with pytest.raises(ResourceError, match="connection timed out"):
        task.begin(ctx, {"epoch": 3})
    # a checkpoint really gone still means training from epoch 1
    ctx.earlier_output = Storage(str(tmp_path / "gen-0"))
    assert task.begin(ctx, {"epoch": 3}) is None and "training from epoch 1" in logged[-1]


def test_an_epochs_lr_is_the_rate_its_last_step_trained_at():
    """Read after the scheduler's step, it was the next epoch's first rate: every epoch line and
    TensorBoard's optim/lr ran a step ahead, and the last epoch always showed the floor."""
    from types import SimpleNamespace

    from remem_ray.config import ScheduleConfig
    from remem_ray.train.common import PerStepSchedule
    from remem_ray.train.loop import Task

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.1)
    used: list[float] = []

    class Steps(Task):
        def step(self, images, labels, extra):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            return torch.tensor(1.0), torch.zeros(len(labels), 2)

    task = Steps()
    task.model, task.scheduler = torch.nn.Linear(1, 1), PerStepSchedule(opt, ScheduleConfig(min_lr_ratio=0.0), 2, 2)
    batches = [(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))] * 2
    ctx = SimpleNamespace(device=torch.device("cpu"))
    first, last = task.train_epoch(ctx, batches), task.train_epoch(ctx, batches)
    assert first["lr"] == pytest.approx(used[1]) and last["lr"] == pytest.approx(used[3])
    assert last["lr"] > 0.0  # the floor (0) is where the schedule ends, after the last step
