"""The teacher-target cache's own logic: fixed views, lookup, keys, rebuilds."""

import contextlib

import pytest
import torch

from remem_ray.checkpoints import write_checkpoint
from remem_ray.config import load_run_spec
from remem_ray.data import FixedViews, LoaderPipeline, Shard, Views, build_datasets
from remem_ray.models import create_model, normalizer_for
from remem_ray.storage import Storage
from remem_ray.train.targets import CachedTargets, compute_targets, load_or_build_targets

CPU = torch.device("cpu")


def _loader(splits):
    return LoaderPipeline(splits, CPU, 0, Shard(), num_workers=0)


SPEC = {
    "data.name": "synthetic",
    "data.num_classes": 3,
    "data.samples_per_class": 12,
    "teacher.model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
    "student.teacher_targets": "cached",
    "student.target_views": 3,
}


def _kept(targets) -> list:
    """What a run kept in a targets folder (a table, a refusal), less the leases of who built them."""
    return sorted(p for p in targets.iterdir() if p.suffix != ".lease") if targets.exists() else []


def _setup(tmp_path, **overrides):
    spec = load_run_spec(None, {**SPEC, "storage.root": str(tmp_path), **overrides})
    splits = build_datasets(spec.data, spec.seed)
    torch.manual_seed(0)
    teacher = create_model(spec.teacher.model, 3, spec.data.img_size, spec.teacher.model_kwargs).eval()
    storage = Storage(str(tmp_path / "teacher"))
    write_checkpoint(storage, "epoch_1", teacher, {"model": spec.teacher.model})
    return spec, splits, teacher, storage


def test_fixed_views_repeat_exactly_and_differ_between_views(tmp_path):
    spec, splits, *_ = _setup(tmp_path)
    views = FixedViews(splits.train, n_views=4, view_seed=7)
    first = views.view(3, 2)[0]
    torch.rand(100)  # the global RNG moving on must not change a fixed view
    assert torch.equal(views.view(3, 2)[0], first)
    assert not torch.equal(views.view(3, 1)[0], first)
    assert not torch.equal(FixedViews(splits.train, 4, view_seed=8).view(3, 2)[0], first)
    image, label, index, view = views[5]
    assert index == 5 and 0 <= view < 4 and torch.equal(image, views.view(5, view)[0])


def test_cached_lookup_equals_running_the_teacher_on_that_view(tmp_path):
    spec, splits, teacher, _ = _setup(tmp_path)
    views = FixedViews(splits.train, 3, 0)
    norm = normalizer_for(teacher)
    table = compute_targets(teacher, norm, _loader(splits), Views(3, 0), batch_size=7)
    assert table.shape == (len(splits.train), 3, 3) and table.dtype == torch.float16
    source = CachedTargets(table, Views(3, 0), CPU)
    index, view = torch.tensor([4, 0, 9]), torch.tensor([2, 1, 0])
    with torch.no_grad():
        expected = teacher(norm(torch.stack([views.view(int(i), int(v))[0] for i, v in zip(index, view)])))
    torch.testing.assert_close(source(None, [index, view]), expected, atol=2e-2, rtol=1e-2)


def test_cache_is_reused_then_rebuilt_when_corrupt_or_the_data_changes(tmp_path):
    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    args = (teacher, normalizer_for(teacher), _loader(splits), True)
    table, info = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert info["built"] and info["location"].startswith(storage.uri("targets", "epoch_1-"))
    again, info2 = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert not info2["built"] and torch.equal(again, table)

    path = tmp_path / "teacher" / "targets" / info["location"].rsplit("/", 1)[1]
    path.write_bytes(path.read_bytes()[:100])  # truncated
    repaired, info3 = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert info3["built"] and torch.equal(repaired, table)

    other_views = load_run_spec(None, {**SPEC, "storage.root": str(tmp_path), "student.target_views": 2})
    table2, info4 = load_or_build_targets(other_views, location, *args, log=lambda m: None)
    assert info4["built"] and info4["key"] != info["key"] and table2.shape[1] == 2


def test_same_weights_under_another_reweighting_get_their_own_cache(tmp_path):
    """The cache key covers meta.json's logit-shaping fields, not only model.pt."""
    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    args = (teacher, normalizer_for(teacher), _loader(splits), True)
    write_checkpoint(
        storage, "epoch_1", teacher, {"model": spec.teacher.model, "reweighting": {"alpha": 0.9, "mode": "remem"}}
    )
    _, first = load_or_build_targets(spec, location, *args, log=lambda m: None)
    write_checkpoint(
        storage,
        "epoch_1",
        teacher,
        {
            "model": spec.teacher.model,  # same model.pt bytes
            "reweighting": {"alpha": 0.5, "mode": "remem"},
        },
    )
    _, second = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert second["built"] and second["key"] != first["key"]
    write_checkpoint(
        storage,
        "epoch_1",
        teacher,
        {"model": spec.teacher.model, "metrics": {"val_acc": 0.5}, "reweighting": {"alpha": 0.5, "mode": "remem"}},
    )
    _, third = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert not third["built"] and third["key"] == second["key"]  # metrics do not shape logits


class _NaNForSomeImages(torch.nn.Module):
    """A teacher whose logits are NaN where an image's first pixel is bright (a few views)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        logits = self.teacher(x)
        return torch.where(x[:, :1, 0, 0] > 0.5, torch.full_like(logits, float("nan")), logits)


def test_a_teacher_giving_non_finite_logits_is_refused_with_nothing_cached(tmp_path):
    """Before, the NaN targets were cached and served: the student's loss went NaN and its
    divergence was recorded against the student's key (and settings) for good."""
    from remem_ray.checkpoints import CheckpointError

    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    bad_teacher = _NaNForSomeImages(teacher)
    args = (bad_teacher, normalizer_for(teacher), _loader(splits), True)
    with pytest.raises(CheckpointError, match=r"non-finite logits .* for 6 of 69 views; nothing cached") as first:
        load_or_build_targets(spec, location, *args, log=lambda m: None)
    targets = tmp_path / "teacher" / "targets"
    assert [p.suffix for p in _kept(targets)] == [".refused"]  # no table
    # a retry (Train's, Tune's) or another trial of these weights and data is refused at once: it
    # computed them again (minutes on a GPU for a large set). Its teacher's logits are not even asked for.
    computed = []
    asked = (lambda *a, **k: computed.append(1)), normalizer_for(teacher), _loader(splits), True
    with pytest.raises(CheckpointError) as again:
        load_or_build_targets(spec, location, *asked, log=lambda m: None)
    (note,) = _kept(targets)
    assert str(again.value) == f"{first.value} (refused before: {note}; remove it to compute them again)"
    assert computed == []
    # a refusal on another device or torch build (bf16 on CUDA, a kernel's bug) does not hold here;
    # nor does an unreadable note: the targets are computed, and judged on what they are
    import json

    kept = json.loads(note.read_text())
    for other in ({**kept, "computed_on": {**kept["computed_on"], "device": "cuda"}}, {"problem": ""}, "not json"):
        note.write_text(other if isinstance(other, str) else json.dumps(other))
        with pytest.raises(CheckpointError, match=r"non-finite logits .* nothing cached: [^(]*$"):
            load_or_build_targets(spec, location, *args, log=lambda m: None)
    note.unlink()
    # a cache written before the check (same key) is refused when read, not served
    table = compute_targets(bad_teacher, normalizer_for(teacher), _loader(splits), Views(3, 0))
    assert not torch.isfinite(table).all()
    good, info = load_or_build_targets(
        spec, location, teacher, normalizer_for(teacher), _loader(splits), True, log=lambda m: None
    )
    path = tmp_path / "teacher" / "targets" / info["location"].rsplit("/", 1)[1]
    torch.save({"key": info["key"], "format": 1, "logits": table}, path)
    with pytest.raises(CheckpointError, match="non-finite logits"):
        load_or_build_targets(spec, location, *args, log=lambda m: None)


@contextlib.contextmanager
def _gloo_rank(rank: int, world: int, tmp: str, timeout_s: float):
    """One rank of a DDP run on gloo: (its tmp_path, spec, splits, teacher, teacher location);
    a collective another rank never reaches ends after `timeout_s`, not gloo's 30 minutes."""
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    init = f"file://{tmp_path / 'init'}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        spec = load_run_spec(None, {**SPEC, "storage.root": str(tmp_path)})
        splits = build_datasets(spec.data, spec.seed)
        torch.manual_seed(0)
        teacher = create_model(spec.teacher.model, 3, spec.data.img_size, spec.teacher.model_kwargs).eval()
        yield tmp_path, spec, splits, teacher, Storage(str(tmp_path / "teacher")).uri("epoch_1")
    finally:
        dist.destroy_process_group()


def _ranks_meeting_a_refused_cache(rank: int, world: int, tmp: str) -> None:
    import json

    from remem_ray.errors import ResourceError
    from remem_ray.train import targets as targets_module
    from remem_ray.train.targets import cache_key, teacher_identity

    compute = targets_module.compute_targets
    with _gloo_rank(rank, world, tmp, timeout_s=20) as (tmp_path, spec, splits, teacher, location):
        outcomes = {}
        targets = tmp_path / "teacher" / "targets"
        teacher_storage = Storage(str(tmp_path / "teacher"))
        key = cache_key(spec, teacher_identity(teacher_storage, "epoch_1"), 23, _loader(splits).identity())
        unkept = targets / f"epoch_1-{key}.unkept"
        for case in ("non-finite", "rank-1-fails", "unkept-rank-1-fails", "write-fails"):
            if case == "unkept-rank-1-fails" and rank == 0:  # a holder that could not keep its table
                unkept.write_text("the run that computed these targets could not keep them")
            if case == "rank-1-fails" and rank == 1:

                def out_of_memory(*args, **kwargs):
                    raise RuntimeError("CUDA out of memory")

                targets_module.compute_targets = out_of_memory
            if case == "rank-1-fails" and rank == 0:
                for note in (tmp_path / "teacher" / "targets").glob("*.refused"):  # the same weights, sound now
                    note.unlink()
            if case == "write-fails" and rank == 1:
                targets_module.compute_targets = compute
            if case == "write-fails" and rank == 0:
                unkept.unlink()

                def refused(self, rel, data):
                    raise ResourceError(f"storage: cannot write {rel}: Access Denied")

                Storage.write_bytes = Storage.write_with = refused
            source = _NaNForSomeImages(teacher) if case == "non-finite" else teacher
            try:
                load_or_build_targets(spec, location, source, normalizer_for(teacher), _loader(splits), rank == 0)
                outcomes[case] = "served"
            except Exception as exc:  # noqa: BLE001  (the barrier's timeout, before)
                outcomes[case] = f"{type(exc).__name__}: {exc}"
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(outcomes))


def test_every_rank_hears_rank_0_refuse_or_fail_to_build_the_cache_none_waits_at_the_barrier(tmp_path):
    """A refusal of non-finite targets, a rank's failure to compute its share, or rank 0's failure
    to write the cache, reaches every rank: before, rank 0 raised it before a barrier, and the
    others waited there until Train ended the group (or died on a gloo error, naming nothing)."""
    import json

    import torch.multiprocessing as mp

    _setup(tmp_path)  # the teacher's checkpoint, written once
    mp.spawn(_ranks_meeting_a_refused_cache, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["non-finite"].startswith("CheckpointError: student.teacher_targets: teacher ")
    assert "6 of 69 views" in rank0["non-finite"] and rank1["non-finite"] == rank0["non-finite"]
    for case in ("rank-1-fails", "unkept-rank-1-fails"):  # the second: no outage to wait through and compute again
        assert rank1[case] == "RuntimeError: CUDA out of memory"  # its own error
        assert rank0[case] == (
            "CheckpointError: student.teacher_targets: rank 1 could not compute its share of the cache: "
            "CUDA out of memory"
        )
    assert rank0["write-fails"].startswith("ResourceError: storage: cannot write targets/")  # its own error
    assert rank1["write-fails"].startswith("CheckpointError: student.teacher_targets: rank 0 could not build")
    assert "Access Denied" in rank1["write-fails"]
    assert _kept(tmp_path / "teacher" / "targets") == []  # nor a part of any rank


def _ranks_sharing_the_computation(rank: int, world: int, tmp: str) -> None:
    import json

    from remem_ray.train import targets as targets_module

    with _gloo_rank(rank, world, tmp, timeout_s=60) as (tmp_path, spec, splits, teacher, location):
        shares, compute = [], targets_module.compute_targets

        def recorded(*args, images=None, **kwargs):
            shares.append(None if images is None else [images.start, images.stop])
            return compute(*args, images=images, **kwargs)

        targets_module.compute_targets = recorded
        said: list[str] = []
        runs = []
        for _ in range(2):  # built, then read
            table, info = load_or_build_targets(
                spec,
                location,
                teacher,
                normalizer_for(teacher),
                _loader(splits),
                rank == 0,
                log=said.append,
                stale_after_s=3.0,
            )
            runs.append(info["built"])
        torch.save(table, tmp_path / f"table{rank}.pt")
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"shares": shares, "built": runs, "said": said}))


def test_ranks_of_a_ddp_run_compute_the_targets_together_each_its_share(tmp_path):
    """Rank 0 computed the whole table while the other ranks waited in a collective, which Ray
    Train ends after 30 minutes (ImageNet x 8 views of a ViT-B on one card is about an hour); and
    a DDP run took no lease, computing beside whoever held it. Here a silent holder holds it."""
    import json

    import torch.multiprocessing as mp

    from remem_ray.leases import Lease
    from remem_ray.train.target_cache import lease_location
    from remem_ray.train.targets import cache_key, teacher_identity

    spec, splits, teacher, storage = _setup(tmp_path)
    key = cache_key(spec, teacher_identity(storage, "epoch_1"), len(splits.train), _loader(splits).identity())
    assert Lease(storage.child(lease_location("epoch_1", key)), "a run on another host", 60).try_acquire()
    alone = compute_targets(teacher, normalizer_for(teacher), _loader(splits), Views(3, 0))
    mp.spawn(_ranks_sharing_the_computation, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["shares"] == [[0, 11]] and rank1["shares"] == [[11, 23]]  # 23 training images, once
    assert rank0["built"] == rank1["built"] == [True, False]
    assert rank0["said"][0].startswith("teacher targets: a run on another host is computing them; waiting for ")
    assert rank0["said"][1].startswith("computing teacher targets: 23 images x 3 views, a share on each of 2 ranks")
    for rank in (0, 1):  # what one process computes alone, up to batch-dependent float rounding
        table = torch.load(tmp_path / f"table{rank}.pt")
        assert table.shape == alone.shape and torch.allclose(table.float(), alone.float(), atol=1e-2)
    assert [p.suffix for p in _kept(tmp_path / "teacher" / "targets")] == [".pt"]  # the table; no part left


def test_targets_that_cannot_be_kept_still_serve_the_run_of_one_worker(tmp_path, monkeypatch):
    """A teacher in a folder the run may read but not write (`remem distill` from another's
    `s3://` checkpoint) failed the run once its targets were computed, and each retry again."""
    from remem_ray.errors import ResourceError

    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    args = (teacher, normalizer_for(teacher), _loader(splits), True)
    created = Storage.create_exclusive

    def read_only_targets(write):
        def refused_there(self, rel, data):
            if "targets" in self.uri(rel):
                raise ResourceError(f"storage: cannot write {self.uri(rel)}: Access Denied")
            write(self, rel, data)

        return refused_there

    def no_lease(self, rel, data):
        if "targets" in self.uri(rel):
            raise ResourceError(f"storage: cannot create {self.uri(rel)}: Access Denied")
        return created(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", read_only_targets(Storage.write_bytes))
    monkeypatch.setattr(Storage, "write_with", read_only_targets(Storage.write_with))
    monkeypatch.setattr(Storage, "create_exclusive", no_lease)
    said: list[str] = []
    table, info = load_or_build_targets(spec, location, *args, log=said.append)
    expected = compute_targets(teacher, normalizer_for(teacher), _loader(splits), Views(3, 0))
    assert info["built"] and torch.equal(table, expected)
    assert not (tmp_path / "teacher" / "targets").exists()
    assert said[0].startswith("teacher targets: no lease to take (storage: cannot create")
    assert said[-1].startswith("teacher targets not kept (storage: cannot write") and "Access Denied" in said[-1]


def test_a_cache_is_never_served_to_views_drawn_another_way(tmp_path, monkeypatch):
    """The key held the data spec and the pipeline's kind, not how views are drawn: a release
    changing the crop's constants or draw order, on the shared teacher registry, would pair the
    stored logits with other pictures than the student sees, silently."""
    from dataclasses import replace

    from remem_ray.data import augment

    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    norm = normalizer_for(teacher)
    _, first = load_or_build_targets(spec, location, teacher, norm, _loader(splits), True, log=lambda m: None)
    wider = replace(splits, augment=replace(splits.augment, pad=splits.augment.pad + 1))
    _, other = load_or_build_targets(spec, location, teacher, norm, _loader(wider), True, log=lambda m: None)
    assert other["built"] and other["key"] != first["key"]
    monkeypatch.setattr(augment, "VIEWS_VERSION", augment.VIEWS_VERSION + 1)
    _, redrawn = load_or_build_targets(spec, location, teacher, norm, _loader(splits), True, log=lambda m: None)
    assert redrawn["built"] and redrawn["key"] not in (first["key"], other["key"])


def test_runs_that_want_the_same_targets_compute_them_once(tmp_path, monkeypatch):
    """Trials that differ only in student settings start their runs together once their teacher
    is stored, and each computed the same table (minutes of a GPU each on a large set). The
    second run now waits on the first's lease and reads its table."""
    import threading

    from remem_ray.train import target_cache
    from remem_ray.train import targets as targets_module

    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    monkeypatch.setattr(target_cache, "WAIT_POLL_S", 0.05)
    computing, finish = threading.Event(), threading.Event()
    computed_by: list[str] = []
    compute = targets_module.compute_targets

    def held_open(*args, **kwargs):  # the first run computes until the second is seen waiting
        computed_by.append(threading.current_thread().name)
        computing.set()
        assert finish.wait(60)
        return compute(*args, **kwargs)

    monkeypatch.setattr(targets_module, "compute_targets", held_open)
    results, waiting = {}, threading.Event()

    def second_says(line: str) -> None:
        if "is computing them; waiting for" in line:
            waiting.set()

    def run(log) -> None:
        name = threading.current_thread().name
        results[name] = load_or_build_targets(
            spec, location, teacher, normalizer_for(teacher), _loader(splits), True, log=log
        )

    first = threading.Thread(target=run, args=(lambda line: None,), name="first")
    second = threading.Thread(target=run, args=(second_says,), name="second")
    first.start()
    assert computing.wait(60)
    second.start()
    seen_waiting = waiting.wait(30)
    finish.set()
    first.join(60)
    second.join(60)
    assert seen_waiting and computed_by == ["first"]
    (table, built), (read, waited) = results["first"], results["second"]
    assert built["built"] and not waited["built"] and torch.equal(read, table)


def test_a_table_its_holder_could_not_keep_is_computed_beside_not_in_turn(tmp_path, monkeypatch):
    """Where the lease's record fits but the table does not (a full disk, a grant for small
    objects), each waiter took the released lease, found no table, computed and failed to keep
    it in turn: K runs one after another, each holding its Train run's GPU while it waited."""
    from remem_ray.errors import ResourceError

    spec, splits, teacher, storage = _setup(tmp_path)
    location = storage.uri("epoch_1")
    streamed = Storage.write_with  # how tables are written

    def no_room_for_tables(self, rel, write):
        if self.uri(rel).endswith(".pt"):
            raise ResourceError(f"storage: cannot write {self.uri(rel)}: No space left on device")
        streamed(self, rel, write)

    monkeypatch.setattr(Storage, "write_with", no_room_for_tables)
    args = (teacher, normalizer_for(teacher), _loader(splits), True)
    first: list[str] = []
    table, info = load_or_build_targets(spec, location, *args, log=first.append)
    assert info["built"] and [p.suffix for p in _kept(tmp_path / "teacher" / "targets")] == [".unkept"]
    later: list[str] = []
    again, info2 = load_or_build_targets(spec, location, *args, log=later.append)
    assert info2["built"] and torch.equal(again, table)
    assert later[0] == "teacher targets: the run that computed them could not keep them; computing them here"
    monkeypatch.setattr(Storage, "write_with", streamed)  # room made: kept at last, and the note goes
    (tmp_path / "teacher" / "targets" / info["location"].rsplit("/", 1)[1]).unlink(missing_ok=True)
    _, kept = load_or_build_targets(spec, location, *args, log=lambda m: None)
    assert kept["built"] and [p.suffix for p in _kept(tmp_path / "teacher" / "targets")] == [".pt"]


def test_a_storage_blip_while_looking_for_targets_is_waited_through(tmp_path, monkeypatch):
    """One unanswered look (a 503, a dropped connection) failed the Train run, and each retry."""
    from remem_ray.errors import ResourceError
    from remem_ray.train import target_cache

    spec, splits, teacher, storage = _setup(tmp_path)
    monkeypatch.setattr(target_cache, "WAIT_POLL_S", 0.0)
    looked = Storage.is_file
    blips = [1]

    def once_unanswered(self, rel):
        if rel.endswith(".refused") and blips:
            blips.pop()
            raise ResourceError(f"storage: cannot read {self.uri(rel)}: 503 Slow Down")
        return looked(self, rel)

    monkeypatch.setattr(Storage, "is_file", once_unanswered)
    said: list[str] = []
    table, info = load_or_build_targets(
        spec, storage.uri("epoch_1"), teacher, normalizer_for(teacher), _loader(splits), True, log=said.append
    )
    assert info["built"] and not blips
    assert said[0].startswith("teacher targets: storage did not answer (storage: cannot read") and "503" in said[0]


def test_a_refusal_kept_while_the_lease_was_being_taken_is_not_computed_again(tmp_path, monkeypatch):
    """The holder refused the targets and released the lease between a waiter's look and its
    take: the waiter computed them again (minutes of a GPU) to refuse them again."""
    import json

    from remem_ray.checkpoints import CheckpointError
    from remem_ray.leases import Lease
    from remem_ray.train.target_cache import _computed_on

    spec, splits, teacher, storage = _setup(tmp_path)
    take = Lease.try_acquire

    def refused_meanwhile(self, gone=None):
        name = self.folder.uri().rsplit("/", 1)[1].removesuffix(".lease")
        note = {"problem": "student.teacher_targets: teacher gives non-finite logits", "computed_on": _computed_on(CPU)}
        storage.write_text(f"targets/{name}.refused", json.dumps(note))
        return take(self, gone)

    monkeypatch.setattr(Lease, "try_acquire", refused_meanwhile)
    computed = []
    asked = (lambda *a, **k: computed.append(1)), normalizer_for(teacher), _loader(splits), True
    with pytest.raises(CheckpointError, match="non-finite logits .refused before"):
        load_or_build_targets(spec, storage.uri("epoch_1"), *asked, log=lambda m: None)
    assert computed == []


def test_a_lease_record_refused_once_by_a_busy_server_is_an_outage_not_a_read_only_grant(tmp_path, monkeypatch):
    """Any failed write of the lease's record counted as a read-only grant: the run computed the
    targets without the lease, beside a live holder (a review's finding). Only a refusal is one."""
    from remem_ray.errors import ResourceError
    from remem_ray.train import target_cache

    spec, splits, teacher, storage = _setup(tmp_path)
    monkeypatch.setattr(target_cache, "WAIT_POLL_S", 0.0)
    created, busy = Storage.create_exclusive, [1, 2]

    def slow_down(self, rel, data):
        if "targets" in self.uri(rel) and busy:
            busy.pop()
            raise ResourceError(f"storage: cannot write {self.uri(rel)}: 503 Slow Down")
        return created(self, rel, data)

    monkeypatch.setattr(Storage, "create_exclusive", slow_down)
    said: list[str] = []
    _, info = load_or_build_targets(
        spec, storage.uri("epoch_1"), teacher, normalizer_for(teacher), _loader(splits), True, log=said.append
    )
    assert info["built"] and not busy
    assert not any("no lease to take" in line for line in said)
    assert said[0].startswith("teacher targets: storage did not answer") and "503 Slow Down" in said[0]
    assert (tmp_path / "teacher" / "targets" / f"epoch_1-{info['key']}.lease").is_dir()  # computed under it


def test_a_silent_targets_holder_is_taken_over_after_the_stale_window_given(tmp_path):
    """The targets lease had the 60 s default window whatever the sweep set (a sweep of 15 s
    waited four times as long on a dead holder); and its wait limit was a fixed 6 h."""
    from remem_ray.leases import Lease
    from remem_ray.train.target_cache import Waits, built_once, lease_location

    parent = Storage(str(tmp_path))
    silent = Lease(parent.child(lease_location("epoch_1", "k")), "a run on another host", 60)
    assert silent.try_acquire()  # and never beats again: no process of this host to see ended
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    def build():
        return torch.zeros(2, 1, 3), None

    said: list[str] = []
    table, problem, built = built_once(
        parent, "epoch_1", "k", build, CPU, said.append, Waits(stale_after_s=15.0), sleep, lambda: now[0]
    )
    assert built and problem is None and table.shape == (2, 1, 3)
    assert 15.0 <= now[0] <= 15.0 + 2 * 2.0  # taken over once 15 s passed without a beat
    assert said[0] == "teacher targets: a run on another host is computing them; waiting for " + parent.uri(
        "targets/epoch_1-k.pt"
    )


def test_a_run_waits_on_a_beating_targets_holder_no_longer_than_the_limit_given(tmp_path):
    from remem_ray.leases import Lease
    from remem_ray.train.target_cache import Waits, built_once, lease_location

    parent = Storage(str(tmp_path))
    hung = Lease(parent.child(lease_location("epoch_1", "k")), "a hung run", 60)
    assert hung.try_acquire()
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        assert hung.renew()  # its heartbeat goes on, its computation never ends

    said: list[str] = []
    waits = Waits(stale_after_s=15.0, wait_limit_s=40.0)
    _, _, built = built_once(
        parent, "epoch_1", "k", lambda: (torch.zeros(2, 1, 3), None), CPU, said.append, waits, sleep, lambda: now[0]
    )
    assert built and 40.0 < now[0] <= 44.0
    assert said[-1] == "teacher targets: waited 40 s for the run computing them; computing them here"


def test_a_student_loop_hands_its_configs_lease_settings_to_the_targets_wait(tmp_path, monkeypatch):
    """From LoopConfig (the sweep's settings) through the loop's context to the targets' wait."""
    from helpers.sessions import FileSession

    from remem_ray.contract import LoopConfig
    from remem_ray.train import student as student_module
    from remem_ray.train.loop import prepare

    spec, splits, teacher, storage = _setup(tmp_path)
    session = FileSession(tmp_path / "state")
    config = LoopConfig(spec, str(tmp_path / "out"), session=session, lease_stale_after_s=12.0, wait_limit_s=34.0)
    asked = {}

    def load(*args, **kwargs):
        asked.update(kwargs)
        return torch.zeros(len(splits.train), 3, 3), {"built": True}

    monkeypatch.setattr(student_module, "load_or_build_targets", load)
    student_module.target_source(prepare(config, "student"), storage.uri("epoch_1"), teacher, normalizer_for(teacher))
    assert (asked["stale_after_s"], asked["wait_limit_s"]) == (12.0, 34.0)


def test_a_storage_error_while_reading_a_table_is_no_reason_to_compute_it_again(tmp_path, monkeypatch):
    """Read as a stream, a failed read inside torch.load looks like a corrupt file: the table,
    a GPU-hour on ImageNet, would be computed again over one dropped connection."""
    from remem_ray.errors import ResourceError
    from remem_ray.storage import fs as fs_module

    spec, splits, teacher, storage = _setup(tmp_path)
    args = (spec, storage.uri("epoch_1"), teacher, normalizer_for(teacher), _loader(splits), True)
    table, _ = load_or_build_targets(*args, log=lambda m: None)
    reads: list[int] = []

    class Dropped:
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def readinto(self, buffer):  # how torch.load reads a zip's records (read: where this fails)
            return self._dropped(self.file.readinto, buffer)

        def read(self, *args):
            return self._dropped(self.file.read, *args)

        def _dropped(self, call, *args):  # from the third read on, the connection is gone
            reads.append(1)
            if len(reads) >= 3:
                raise OSError("Connection reset by peer")
            return call(*args)

    noting = fs_module.NotingFile
    monkeypatch.setattr(fs_module, "NotingFile", lambda file, chunk=None: noting(Dropped(file), chunk))
    with pytest.raises(ResourceError, match="Connection reset by peer"):
        load_or_build_targets(*args, log=lambda m: None)
    monkeypatch.setattr(fs_module, "NotingFile", noting)
    again, info = load_or_build_targets(*args, log=lambda m: None)
    assert not info["built"] and torch.equal(again, table)


def test_a_disk_that_fills_while_a_table_is_written_leaves_the_run_its_targets(tmp_path, monkeypatch):
    """torch.save turned the disk's ENOSPC into a RuntimeError of its own: the run of one worker,
    which holds its table, failed instead of going on without keeping it."""
    import builtins
    import errno

    from remem_ray.storage import fs as fs_module

    spec, splits, teacher, storage = _setup(tmp_path)

    class Full:
        def __init__(self, file):
            self.file, self.room = file, 600

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

    def full_for_tables(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return Full(file) if ".pt.tmp-" in str(path) else file

    monkeypatch.setattr(fs_module, "open", full_for_tables, raising=False)
    said: list[str] = []
    args = (spec, storage.uri("epoch_1"), teacher, normalizer_for(teacher), _loader(splits), True)
    table, info = load_or_build_targets(*args, log=said.append)
    assert info["built"] and table.shape == (23, 3, 3)
    assert any(
        line.startswith("teacher targets not kept (storage: cannot write") and "No space left" in line for line in said
    )
    assert [p.suffix for p in _kept(tmp_path / "teacher" / "targets")] == [".unkept"]  # no temp file left


def test_a_folder_relabelled_or_rewritten_at_the_same_count_gets_targets_of_its_own(tmp_path):
    """The key named the data's settings and its size, not its files: an image moved to another
    class (ImageFolder's order changes) or rewritten paired the stored rows with other pictures.
    A copy of the same files (another node's download: other mtimes) keeps the key."""
    import os

    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / cls / f"{cls}{i}.png")
    spec, _, teacher, storage = _setup(tmp_path / "run", **{"data.name": "imagefolder", "data.root": str(root)})

    def targets() -> dict:
        splits = build_datasets(spec.data, spec.seed)
        args = (teacher, normalizer_for(teacher), _loader(splits), True)
        return load_or_build_targets(spec, storage.uri("epoch_1"), *args, log=lambda m: None)[1]

    first = targets()
    assert first["built"] and not targets()["built"]
    for path in root.rglob("*.png"):  # a copy: the same files, written at another time
        os.utime(path, ns=(1, 1))
    assert not targets()["built"]
    (root / "a" / "a3.png").rename(root / "b" / "a3.png")  # relabelled, both ways: the same count
    (root / "b" / "b7.png").rename(root / "a" / "b7.png")
    relabelled = targets()
    assert relabelled["built"] and relabelled["key"] != first["key"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a" / "a0.png")  # rewritten
    rewritten = targets()
    assert rewritten["built"] and rewritten["key"] not in (first["key"], relabelled["key"])
