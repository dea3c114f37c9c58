"""The chaos run: two sweeps on one SeaweedFS root, driven through seeded faults, then checked
against a clean sweep of the same points (issue 24; not in CI, 25-40 minutes on 2 cores).

    python -m benchmarks.chaos [--seed 0] [--faults 24] [--workdir DIR]
    python -m benchmarks.chaos --check DIR    (the checks and the clean sweep again, on a finished run)

A Ray head and one extra node (the "fake node" whose raylet is killed, then replaced) on
127.0.0.1; every process is started here and ended by PID. Two `remem sweep run` drivers of
search_spaces/default.yaml (as `chaos-a` and `chaos-b`: the same points, so they share every
teacher) run on that cluster and root while faults are injected one after another at moments
drawn from the seed:

    driver     SIGKILL a sweep's driver, then `remem sweep resume` it
    trial      SIGKILL a trial's process (Tune retries it)
    worker     SIGKILL a Ray Train worker (Train retries from its last checkpoint)
    raylet     SIGKILL the extra node's raylet and everything on it; a new node joins
    s3         stop the S3 server for 10-60 s, then start it over its data
    pause      SIGSTOP the process holding a teacher's lease past the stale window
               (60 s), then SIGCONT it: the fencing case
    truncate   truncate a checkpoint file of a teacher set in use (after its manifest)

At the end: faults injected and survived, teacher trainings per key (publications of the key's
set: one per key plus the retrainings the truncations forced), trials lost, sha256 failures
left in what readers use, and every chaos trial's student metrics against a clean sweep
(embedded local Ray, a fresh local root) of the same points.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's real servers: SeaweedFS, Ray heads, process trees

from helpers.servers import ProcessTree, RayHead, SeaweedFS, _venv_tool  # noqa: E402

from remem_ray.checkpoint_files import best_location, checkpoint_name, verify_checkpoint  # noqa: E402
from remem_ray.contract import BEST_TEST_ACC, BEST_VAL_ACC, EPOCH  # noqa: E402
from remem_ray.leases import current_record  # noqa: E402
from remem_ray.search_params import TEACHER_EPOCH  # noqa: E402
from remem_ray.storage import Storage  # noqa: E402
from remem_ray.sweep.registry import PUBLISH, TeacherRegistry  # noqa: E402
from remem_ray.teacher_layout import version_file  # noqa: E402

SPEC = ROOT / "search_spaces" / "default.yaml"
SWEEPS = ("chaos-a", "chaos-b")
JOURNAL = "journal.jsonl"
REPAIR = "chaos-repair"  # the sweep that reads truncated sets no chaos trial read again
NUM_SAMPLES = 8  # per sweep: long enough for the faults at their pace (the default spec has 6)
BUCKET, PREFIX = "remem", "chaos"
STALE_S = 60.0  # remem_ray.sweep.registry.STALE_AFTER_S
KINDS = ("driver", "trial", "worker", "raylet", "s3", "pause", "truncate")
# at least three pauses; the rest spread over every kind
MINIMUM = {"pause": 4, "driver": 3, "trial": 3, "worker": 3, "raylet": 2, "s3": 3, "truncate": 2}


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


class ChaosCluster(RayHead):
    """A head and one extra node, as plain processes (host PIDs, so a lease record's pid is the
    process's own), each tracked by a ProcessTree and ended by PID."""

    def __init__(self, workdir: Path, head_cpus: int, node_cpus: int) -> None:
        # a head started with this 0 refuses worker nodes, on Linux too
        super().__init__(workdir, head_cpus, extra_env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
        self.node_cpus = node_cpus
        self.trees: list[ProcessTree] = []
        self.node: subprocess.Popen | None = None
        self.node_tree: ProcessTree | None = None
        self.nodes_started = 0

    def _ray_start(self, args: list[str], log_name: str) -> tuple[subprocess.Popen, ProcessTree]:
        log = open(self.workdir / log_name, "w")
        cmd = [_venv_tool("ray"), "start", "--node-ip-address=127.0.0.1", "--num-gpus=0", "--block", *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        tree = ProcessTree(proc.pid)
        self.trees.append(tree)
        return proc, tree

    def start(self) -> None:
        self.proc, _ = self._ray_start(
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--num-cpus={self.num_cpus}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
            "head.log",
        )
        self._wait(lambda: self.nodes() is not None, "the head")
        self.add_node()

    def add_node(self) -> None:
        """Start a node and wait until it is alive (a node id not alive before: a killed node may
        still count as alive until the head notices)."""
        self.nodes_started += 1
        before = self._alive()
        self.node, self.node_tree = self._ray_start(
            [f"--address={self.gcs_address}", f"--num-cpus={self.node_cpus}", "--disable-usage-stats"],
            f"node-{self.nodes_started}.log",
        )
        self._wait(lambda: bool(self._alive() - before), f"node {self.nodes_started}")

    def _alive(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() or [] if n.get("state") == "ALIVE"}

    def _wait(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up; see {self.workdir}")
            time.sleep(1)

    def node_raylet(self) -> psutil.Process | None:
        if self.node_tree is None:
            return None
        self.node_tree._scan()
        for pid in self.node_tree.pids:
            try:
                proc = psutil.Process(pid)
                if proc.name() == "raylet":
                    return proc
            except psutil.Error:
                continue
        return None

    def kill_node(self) -> str:
        raylet = self.node_raylet()
        if raylet is None:
            return "no raylet found"
        victims = [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.node_tree.kill_all()  # the node's `ray start` and anything it left
        self.add_node()
        return f"raylet {raylet.pid} and {len(victims) - 1} processes on it; node {self.nodes_started} joined"

    def actors(self) -> list[dict]:
        return self.state("list_actors", filters=[("state", "=", "ALIVE")], limit=1000) or []

    def stop(self) -> None:
        for tree in self.trees:
            tree.kill_all()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Sweep:
    name: str
    proc: subprocess.Popen | None = None
    tree: ProcessTree | None = None
    started_at: float = 0.0
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Chaos:
    def __init__(self, workdir: Path, seed: int, faults: int) -> None:
        self.workdir, self.rng, self.target_faults = workdir, random.Random(seed), faults
        self.server = SeaweedFS(workdir / "seaweed")
        (workdir / "cluster").mkdir(exist_ok=True)
        self.cluster = ChaosCluster(workdir / "cluster", head_cpus=2, node_cpus=2)
        # the cluster's processes reach the bucket with their own credentials, as a cloud
        # cluster's nodes do with their instance role (the drivers do not forward theirs)
        self.cluster.env.update(self.server.env())
        self.sweeps = {name: Sweep(name) for name in SWEEPS}
        self.events: list[dict] = []
        self.truncated: list[dict] = []
        self.pauses: list[dict] = []  # each pause's outcome, once its holder is woken
        self.pausing: threading.Thread | None = None
        self.runs: list[dict] = []  # the chaos phase's wall time and S3 ports
        self.checked: list[dict] = []  # the first check's findings, before any repair
        self.uri = f"s3://{BUCKET}/{PREFIX}"

    # ------------------------------------------------------------------ setup
    def journal(self, kind: str, record: dict) -> None:
        """What was done, as it is done: `--check` reads it back."""
        with open(self.workdir / JOURNAL, "a") as f:
            f.write(json.dumps({"record": kind, **record}) + "\n")

    def load_journal(self) -> None:
        lists = {
            "fault": self.events,
            "truncated": self.truncated,
            "pause": self.pauses,
            "run": self.runs,
            "checked": self.checked,
        }
        for line in (self.workdir / JOURNAL).read_text().splitlines():
            record = json.loads(line)
            lists[record.pop("record")].append(record)

    def storage(self, *parts: str) -> Storage:
        return Storage("/".join([self.uri, *parts]), endpoint=self.server.endpoint)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        env.update(self.server.env())
        env.update({k: self.cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        env.update({"PYTHONUNBUFFERED": "1", "REMEM_CACHE_DIR": str(self.workdir / "cache")})
        return env

    def write_spec(self) -> Path:
        spec = yaml.safe_load(SPEC.read_text())
        spec["storage"]["root"] = self.uri
        spec["sweep"]["max_failures"] = 20  # one trial may meet several of the faults
        spec["sweep"]["num_samples"] = NUM_SAMPLES
        path = self.workdir / "chaos.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    def remem(self, sweep: Sweep, args: list[str]) -> None:
        sweep.starts += 1
        log = self.workdir / f"{sweep.name}-{sweep.starts}.log"
        sweep.logs.append(log)
        sweep.proc = subprocess.Popen(
            [sys.executable, "-m", "remem_ray.cli", *args],
            cwd=self.workdir,
            env=self.env(),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sweep.tree = ProcessTree(sweep.proc.pid)
        sweep.started_at = time.time()

    def start_sweep(self, sweep: Sweep, spec: Path) -> None:
        endpoint = ["--endpoint", self.server.endpoint, "--address", self.cluster.gcs_address]
        self.remem(sweep, ["sweep", "run", str(spec), "--name", sweep.name, *endpoint])

    def resume(self, sweep: Sweep) -> None:
        endpoint = ["--endpoint", self.server.endpoint, "--address", self.cluster.gcs_address]
        self.remem(sweep, ["sweep", "resume", f"{self.uri}/sweeps/{sweep.name}", *endpoint])

    # ------------------------------------------------------------------ targets
    def _actor_pids(self, kinds: tuple[str, ...]) -> list[int]:
        return [int(a["pid"]) for a in self.cluster.actors() if any(k in str(a.get("class_name")) for k in kinds)]

    def holders(self) -> list[tuple[str, int]]:
        """(teacher key, pid) of every lease held now by a live process."""
        teachers = self.storage("teachers")
        found = []
        try:
            for key in teachers.list_dir():
                record = current_record(TeacherRegistry(teachers).folder(key).lease)
                if record is not None and not record.released and psutil.pid_exists(record.pid):
                    found.append((key, record.pid))
        except Exception as exc:  # storage down: no target now
            say(f"cannot list holders ({exc})")
        return found

    def published_sets(self) -> list[tuple[str, str, int]]:
        """(key, set uri, epoch) of each checkpoint of each set in use."""
        teachers = self.storage("teachers")
        registry = TeacherRegistry(teachers)
        out = []
        for key in teachers.list_dir():
            teacher_set = registry.set_in_use(key)
            if teacher_set is None:
                continue
            for name in teacher_set.folder.list_dir():
                if name.startswith("epoch_") and teacher_set.folder.is_file(f"{name}/manifest.json"):
                    out.append((key, teacher_set.uri(), int(name.split("_")[1])))
        return out

    # ------------------------------------------------------------------ faults
    def inject(self, kind: str) -> str | None:
        """Inject one fault of `kind`; a line saying what was done, or None if it has no target now."""
        if kind == "driver":
            running = [s for s in self.sweeps.values() if s.running and time.time() - s.started_at > 40]
            if not running:
                return None
            sweep = self.rng.choice(running)
            sweep.tree.kill_all()
            self.resume(sweep)
            return f"SIGKILL driver of {sweep.name} (pid {sweep.proc.pid} now resuming it)"
        if kind in ("trial", "worker"):
            pids = self._actor_pids(("ImplicitFunc", "remem_trial") if kind == "trial" else ("RayTrainWorker",))
            if not pids:
                return None
            pid = self.rng.choice(sorted(pids))
            psutil.Process(pid).kill()
            return f"SIGKILL {kind} pid {pid}"
        if kind == "raylet":
            return "SIGKILL " + self.cluster.kill_node()
        if kind == "s3":
            seconds = self.rng.uniform(10, 60)
            self.server.stop()
            time.sleep(seconds)
            self.server.start()
            return f"S3 server stopped for {seconds:.0f} s"
        if kind == "pause":
            holders = [] if self.pausing is not None and self.pausing.is_alive() else self.holders()
            if not holders:
                return None
            key, pid = self.rng.choice(holders)
            generation = current_record(TeacherRegistry(self.storage("teachers")).folder(key).lease).generation
            seconds = self.rng.uniform(STALE_S + 15, STALE_S + 35)
            os.kill(pid, signal.SIGSTOP)
            # the pause runs beside the other faults: SIGCONT, and the outcome, come from a thread
            self.pausing = threading.Thread(target=self._wake, args=(key, pid, generation, seconds), daemon=True)
            self.pausing.start()
            return f"SIGSTOP holder pid {pid} of teacher {key[:8]} (generation {generation}) for {seconds:.0f} s"
        if kind == "truncate":
            sets = [s for s in self.published_sets() if not any(t["set"] == s[1] for t in self.truncated)]
            if not sets:
                return None
            key, set_uri, epoch = self.rng.choice(sets)
            folder = Storage(set_uri, endpoint=self.server.endpoint)
            rel = f"{checkpoint_name(epoch)}/model.pt"
            data = folder.read_bytes(rel)
            folder.write_bytes(rel, data[: len(data) // 2])
            self.truncated.append({"key": key, "set": set_uri, "epoch": epoch})
            self.journal("truncated", self.truncated[-1])
            return f"truncated {rel} of teacher {key[:8]} ({set_uri.rsplit('/', 1)[-1]}) to {len(data) // 2} bytes"
        raise ValueError(kind)

    def _wake(self, key: str, pid: int, generation: int, seconds: float) -> None:
        time.sleep(seconds)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # killed meanwhile (its driver or trial was another fault's target)
        try:
            after = current_record(TeacherRegistry(self.storage("teachers")).folder(key).lease)
        except Exception:  # the server is down for another fault: the journal says so
            after = None
        taken = after is not None and after.generation > generation
        record = {"key": key, "pid": pid, "generation": generation, "seconds": round(seconds), "taken_over": taken}
        self.pauses.append(record)
        self.journal("pause", record)
        say(f"SIGCONT holder pid {pid} of teacher {key[:8]}: {'taken over' if taken else 'not taken over'} meanwhile")

    def plan(self) -> list[str]:
        kinds = [k for k, n in MINIMUM.items() for _ in range(n)]
        while len(kinds) < self.target_faults:
            kinds.append(self.rng.choice(KINDS))
        self.rng.shuffle(kinds)
        return kinds

    def drive(self) -> None:
        plan = self.plan()
        say(f"fault plan ({len(plan)}): {' '.join(plan)}")
        started = time.time()
        while any(s.running for s in self.sweeps.values()):
            self.restart_failed()
            if not plan:
                time.sleep(2)
                continue
            time.sleep(self.rng.uniform(3, 12))
            if not any(s.running for s in self.sweeps.values()):
                break
            # the planned kind if it has a target now; else the next planned kind that has one
            # (a pause first whenever one can start and pauses remain: teachers train early)
            order = list(dict.fromkeys(plan))
            if "pause" in order and not (self.pausing and self.pausing.is_alive()) and self.holders():
                order.remove("pause")
                order.insert(0, "pause")
            for kind in order:
                try:
                    done = self.inject(kind)
                except Exception as exc:  # the target went away as we reached for it
                    done, exc_text = None, str(exc)
                    say(f"{kind}: no fault ({exc_text})")
                if done is not None:
                    plan.remove(kind)
                    self.events.append({"t": round(time.time() - started), "kind": kind, "what": done})
                    self.journal("fault", self.events[-1])
                    say(f"fault {len(self.events)}: {done}")
                    break
        self.restart_failed()

    def restart_failed(self) -> None:
        """A driver that ended with an error is resumed (a fault may end a sweep with a resumable
        error); one that ended cleanly is done."""
        for sweep in self.sweeps.values():
            if sweep.proc is not None and sweep.proc.poll() not in (None, 0):
                if sweep.starts >= 8:
                    raise RuntimeError(f"{sweep.name}: still failing after {sweep.starts} starts; see {sweep.logs[-1]}")
                say(f"{sweep.name} ended with {sweep.proc.returncode}: resuming ({sweep.logs[-1].name})")
                self.resume(sweep)

    def wait_all(self) -> None:
        while any(s.running for s in self.sweeps.values()) or any(s.proc.returncode != 0 for s in self.sweeps.values()):
            self.restart_failed()
            time.sleep(2)

    # ------------------------------------------------------------------ checks
    def summaries(self) -> dict[str, dict]:
        return {n: json.loads(self.storage("sweeps", n).read_text("summary.json")) for n in SWEEPS}

    def publications(self) -> dict[str, int]:
        registry = TeacherRegistry(self.storage("teachers"))
        out = {}
        for key in self.storage("teachers").list_dir():
            folder = registry.folder(key)
            kinds = [json.loads(folder.sets.read_text(version_file(v)))["kind"] for v in folder.versions()]
            out[key] = kinds.count(PUBLISH)
        return out

    def sha256_failures(self, summaries: dict[str, dict]) -> list[str]:
        failures = []
        registry = TeacherRegistry(self.storage("teachers"))
        for key in self.storage("teachers").list_dir():
            teacher_set = registry.set_in_use(key)
            for name in teacher_set.folder.list_dir() if teacher_set else []:
                if name.startswith("epoch_"):
                    problem = verify_checkpoint(teacher_set.folder, name)
                    if problem:
                        failures.append(problem)
        for name, summary in summaries.items():
            for row in summary["trials"]:
                student = self.storage("sweeps", name, "students", row["trial_id"])
                best = best_location(student)  # its own, or a stored student's it replayed
                problem = "no best checkpoint" if best is None else verify_checkpoint(*best)
                if problem:
                    failures.append(f"{name}/{row['trial_id']}: {problem}")
        return failures

    def repair_pass(self, spec: Path, unread: list[dict], summaries: dict[str, dict]) -> None:
        """Truncated checkpoints no trial read after the fault are still in their set in use (a
        trial verifies the epoch it distils from): a short sweep with one point per such key and
        epoch reads them, finds the damage and retrains (the self-repair path)."""
        points = []
        for broken in unread:
            row = next(r for s in summaries.values() for r in s["trials"] if r["teacher_key"] == broken["key"])
            points.append({**row["params"], TEACHER_EPOCH.name: broken["epoch"]})
        data = yaml.safe_load(spec.read_text())
        data["sweep"].update(num_samples=len(points), points_to_evaluate=points, asha={"enabled": False})
        data["student"]["epochs"] = 1
        path = self.workdir / "repair.yaml"
        path.write_text(yaml.safe_dump(data))
        sweep = Sweep(REPAIR)
        self.start_sweep(sweep, path)
        sweep.proc.wait()
        sweep.tree.kill_all()
        if sweep.proc.returncode != 0:
            raise RuntimeError(f"the repair sweep failed; see {sweep.logs[-1]}")

    def clean_sweep(self, spec: Path, points: list[dict]) -> dict[tuple, list[dict]]:
        """The same points on a fresh local root, no faults, embedded Ray: point -> result rows."""
        experiment = self.workdir / "clean-results" / "sweeps" / "clean"
        if (experiment / "summary.json").is_file():  # a --check after a finished clean sweep
            return _result_rows(experiment)
        data = yaml.safe_load(spec.read_text())
        data["name"] = "clean"
        data["storage"]["root"] = str(self.workdir / "clean-results")
        data["sweep"].update(num_samples=len(points), points_to_evaluate=points, asha={"enabled": False})
        path = self.workdir / "clean.yaml"
        path.write_text(yaml.safe_dump(data))
        env = {k: v for k, v in self.env().items() if not k.startswith(("AWS_", "RAY_AUTH"))}
        log = self.workdir / "clean.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "remem_ray.cli", "sweep", "run", str(path)],
            cwd=self.workdir,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        tree = ProcessTree(proc.pid)
        try:
            proc.wait()
        finally:
            tree.kill_all()
        if proc.returncode != 0:
            raise RuntimeError(f"the clean sweep failed; see {log}")
        return _result_rows(experiment)


def _result_rows(experiment: Path) -> dict[tuple, list[dict]]:
    """A finished sweep's point -> its trial's result rows."""
    summary = json.loads((experiment / "summary.json").read_text())
    rows = {}
    for row in summary["trials"]:
        lines = (experiment / f"trial_{row['trial_id']}" / "result.json").read_text().splitlines()
        rows[_point(row["params"])] = [json.loads(x) for x in lines if x.strip()]
    return rows


def _point(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def compare(summaries: dict[str, dict], clean: dict[tuple, list[dict]]) -> list[dict]:
    """Each chaos trial's final student metrics beside the clean run's at the same epoch."""
    out = []
    for name, summary in summaries.items():
        for row in summary["trials"]:
            epochs = row["epochs_done"]
            reference = [r for r in clean.get(_point(row["params"]), []) if r[EPOCH] == epochs]
            ref = reference[-1] if reference else {}
            chaos_metrics = (row["student_val_acc"], row["student_test_acc"])
            clean_metrics = (ref.get(BEST_VAL_ACC), ref.get(BEST_TEST_ACC))
            out.append(
                {
                    "sweep": name,
                    "trial": row["trial_id"],
                    "params": row["params"],
                    "epochs": epochs,
                    "chaos": chaos_metrics,
                    "clean": clean_metrics,
                    "equal": None not in clean_metrics
                    and all(abs(a - b) < 1e-9 for a, b in zip(chaos_metrics, clean_metrics)),
                }
            )
    return out


def run_chaos(chaos: Chaos) -> Path:
    """The two sweeps under faults, to the end; the spec they ran."""
    began = time.time()
    chaos.server.start()
    chaos.server.client().create_bucket(Bucket=BUCKET)
    try:
        chaos.cluster.start()
        say(f"S3 at {chaos.server.endpoint}; Ray head {chaos.cluster.gcs_address} and one extra node")
        spec = chaos.write_spec()
        for sweep in chaos.sweeps.values():
            chaos.start_sweep(sweep, spec)
        chaos.drive()
        chaos.wait_all()
        if chaos.pausing is not None:
            chaos.pausing.join()
    finally:
        for sweep in chaos.sweeps.values():
            if sweep.tree is not None:
                sweep.tree.kill_all()
        chaos.cluster.stop()
        chaos.server.stop()
    chaos.runs.append({"chaos_s": time.time() - began, "ports": chaos.server.ports})
    chaos.journal("run", chaos.runs[-1])
    say(f"both sweeps finished after {(time.time() - began) / 60:.1f} min")
    return spec


def check(chaos: Chaos, spec: Path) -> int:
    """What the chaos left: read from the bucket (the server started again over its data), then
    a clean sweep of the same points."""
    began = time.time()
    chaos.server.ports = chaos.runs[-1]["ports"]  # the data's volume locations name these
    chaos.server.endpoint = f"http://127.0.0.1:{chaos.server.ports['s3']}"
    chaos.server.start()
    try:
        summaries = chaos.summaries()
        if not chaos.checked:  # the first check: what the sweeps left, before any repair pass
            unread = [{"key": t["key"], "epoch": t["epoch"]} for t in chaos.truncated if _in_use_broken(chaos, t)]
            chaos.checked.append({"before_repair": chaos.sha256_failures(summaries), "unread": unread})
            chaos.journal("checked", chaos.checked[-1])
        before_repair, unread = chaos.checked[0]["before_repair"], chaos.checked[0]["unread"]
        if unread and not chaos.storage("sweeps", REPAIR).is_file("summary.json"):
            say(f"{len(unread)} truncated set(s) still in use, never read since: a repair sweep reads them")
            chaos.cluster.start()
            try:
                chaos.repair_pass(spec, unread, summaries)
            finally:
                chaos.cluster.stop()
        repair = json.loads(chaos.storage("sweeps", REPAIR).read_text("summary.json")) if unread else {}
        failures = chaos.sha256_failures(summaries)
        publications = chaos.publications()
    finally:
        chaos.server.stop()
    points = list({_point(r["params"]): r["params"] for s in summaries.values() for r in s["trials"]}.values())
    say(f"clean sweep of the {len(points)} distinct points")
    clean = chaos.clean_sweep(spec, points)
    compared = compare(summaries, clean)

    kinds = {k: sum(1 for e in chaos.events if e["kind"] == k) for k in KINDS}
    trials = [r for s in summaries.values() for r in s["trials"]]
    num_samples = yaml.safe_load(spec.read_text())["sweep"]["num_samples"]
    whole = [r for r in trials if r["state"] == "TERMINATED" and r["student_val_acc"] is not None]
    lost = len(SWEEPS) * num_samples - len(whole)
    keys = {r["teacher_key"] for r in trials}
    forced = {e["set"] for s in [*summaries.values(), repair] for e in s.get("integrity_events", [])}
    taken_over = sum(1 for p in chaos.pauses if p["taken_over"])
    equal = sum(1 for c in compared if c["equal"])
    result = {
        "chaos_min": round(chaos.runs[-1]["chaos_s"] / 60, 1),
        "check_min": round((time.time() - began) / 60, 1),
        "faults": chaos.events,
        "faults_by_kind": kinds,
        "pauses": chaos.pauses,
        "trials": len(trials),
        "trials_lost": lost,
        "distinct_teacher_keys": len(keys),
        "publications_per_key": publications,
        "retrainings_forced": len(forced),
        "truncated": chaos.truncated,
        "sha256_failures_before_repair": before_repair,
        "sha256_failures_left": failures,
        "compared": compared,
    }
    (chaos.workdir / "chaos-result.json").write_text(json.dumps(result, indent=2, default=str))
    ok = (
        len(chaos.events) >= 20
        and kinds["pause"] >= 3
        and lost == 0
        and not failures
        and sum(publications.values()) == len(keys) + len(forced)
        and all(n >= 1 for n in publications.values())
        and equal == len(compared)
    )
    print()
    print(f"faults injected: {len(chaos.events)}; survived: {len(chaos.events) if lost == 0 else 'no (trials lost)'}")
    print("  by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    print(f"  holder pauses past the stale window: {kinds['pause']} ({taken_over} taken over meanwhile)")
    print(f"teacher trainings (publications of a set) per key: {sorted(publications.values())}")
    print(f"  distinct keys {len(keys)} + retrainings forced by truncation {len(forced)} = {len(keys) + len(forced)}")
    print(f"trials: {len(trials)}, lost: {lost}")
    print(f"sha256 failures left: {len(failures)} (before the repair pass: {len(before_repair)})")
    print(f"trials equal to the clean sweep's same point at the same epoch: {equal}/{len(compared)}")
    for c in compared:
        if not c["equal"]:
            print(f"  differs: {c}")
    print(f"chaos phase {result['chaos_min']} min, checks and clean sweep {result['check_min']} min")
    print(f"details: {chaos.workdir / 'chaos-result.json'}")
    print("verdict: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--check", type=Path, default=None, metavar="DIR", help="check a finished run's workdir")
    args = parser.parse_args(argv)
    workdir = args.check or args.workdir or Path(tempfile.mkdtemp(prefix="remem-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(workdir, args.seed, args.faults)
    os.environ.update(chaos.server.env())  # this process reads the registry too
    say(f"workdir {workdir}")
    if args.check:
        chaos.load_journal()
        spec = workdir / "chaos.yaml"
    else:
        spec = run_chaos(chaos)
    return check(chaos, spec)


def _in_use_broken(chaos: Chaos, truncated: dict) -> bool:
    teacher_set = TeacherRegistry(chaos.storage("teachers")).set_in_use(truncated["key"])
    return teacher_set is not None and teacher_set.uri() == truncated["set"]


if __name__ == "__main__":
    sys.exit(main())
