"""The sweep driver: Ray on 127.0.0.1 (or a given cluster), a Tuner over the trial, run and resume."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from remem_ray.config import SweepSpec, parse_spec
from remem_ray.console import say
from remem_ray.errors import ResourceError, UserInputError
from remem_ray.inputs import as_begun, identities, with_input_identities
from remem_ray.spec_checks import check_spec, s3_inputs
from remem_ray.storage import Storage, one_line, preflight, preflight_config
from remem_ray.sweep.driver_lease import DriverLease
from remem_ray.sweep.layout import GPU_SHARES_FILE, INPUTS_FILE, LOG_FILE, SWEEP_SPEC_FILE, TUNER_FILE, SweepLayout
from remem_ray.sweep.report import write_report
from remem_ray.sweep.results import SweepSummary, expected_trials, load_trials, summarize, write_summary
from remem_ray.sweep.search import build_scheduler, build_searcher
from remem_ray.sweep.study import StudyExport
from remem_ray.sweep.tune_adapter import keep_credentials_out_of_runtime_envs
from remem_ray.sweep.tune_state import name_newest_state_last, staging_dirs

DASHBOARD_PORT_TRIES = 3
_RAY_WORKER_PORTS_END = 19999  # Ray's workers take 10002-19999 by default


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _dashboard_port() -> int:
    """A free loopback port between Ray's worker ports and the kernel's ephemeral range: a port
    the kernel hands out, free when looked at, can go to any outgoing connection before the
    dashboard binds it (seen in the suite: "address already in use", and the sweep failed)."""
    rng = random.SystemRandom()
    low = _RAY_WORKER_PORTS_END + 1
    high = _ephemeral_low() - 1
    for _ in range(100 if high > low else 0):
        port = rng.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(exc: BaseException) -> bool:
    text = str(exc)
    return "address already in use" in text or "valid port for dashboard" in text


API_SERVER_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first


@contextlib.contextmanager
def _env_var(name: str, value: str):
    """`name` set to `value` while the block runs (processes started meanwhile inherit it)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _cluster_address(address: str | None) -> str | None:
    """The cluster to join, or None for a local Ray on loopback.

    Call before Ray is first imported: in single-machine mode every Ray service must bind
    to 127.0.0.1, and Ray reads the switch for that at import time.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    else:
        _address_parts(address)  # a malformed one is bad input: refused before anything starts
    return address


def _address_field(address: str) -> str:
    """What an error about `address` names: where the user set it."""
    return "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "--address"


def _address_parts(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address; None for auto."""
    if address == "auto":
        return None
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/\s]+?)\]?:(\d{1,5})/?", address)
    if not match:
        web = address.startswith(("http://", "https://"))
        dashboard = (
            " (an http:// address is a dashboard's: `remem sweep submit` takes it, and `sweep resume` "
            "submits a job there)"
            if web
            else ""
        )
        raise UserInputError(
            f"{_address_field(address)}: expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}{dashboard}"
        )
    return match.group(1), int(match.group(2))


def _check_reachable(address: str) -> None:
    """Fail fast on a dead HOST:PORT: ray.init would retry for minutes."""
    parts = _address_parts(address)
    if parts is None:
        return
    try:
        socket.create_connection(parts, timeout=5).close()
    except OSError as exc:
        raise ResourceError(
            f"{_address_field(address)}: cannot reach Ray at {address}: {exc.strerror or exc}"
        ) from None


def _ray_console_level(verbose: bool) -> None:
    """Ray's driver-side records from here on: INFO and up reach the sweep log (progress.py adds
    its handler); Ray's console handler shows errors only (Tune's failure tracebacks not even
    those: progress.py prints a line per failure), or everything with --verbose."""
    from remem_ray.sweep.tune_adapter import TuneFailureRecordsOffConsole

    ray_logger = logging.getLogger("ray")
    ray_logger.setLevel(logging.INFO)
    for handler in ray_logger.handlers:
        handler.setLevel(logging.INFO if verbose else logging.ERROR)
        if not verbose:  # a failed trial's whole traceback: the log has it, the console one line
            handler.addFilter(TuneFailureRecordsOffConsole())


@contextlib.contextmanager
def ray_session(address: str | None = None, verbose: bool = False):
    """Connect to `address` (or RAY_ADDRESS); otherwise start a private Ray on 127.0.0.1, in a
    temp folder removed afterwards (kept when the sweep fails, or with REMEM_KEEP_RAY_LOGS=1).

    The local Ray keeps its dashboard on: Train's cleanup of an ASHA-stopped nested run
    finds the dead controller through the State API the dashboard serves.
    """
    address = _cluster_address(address)
    import ray

    # quiet: Ray's notices while it starts (token auth, ...) stay off the console entirely
    level = logging.INFO if verbose else logging.ERROR
    temp_dir = None
    with contextlib.ExitStack() as stack:
        if address:
            _check_reachable(address)
            try:
                context = ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level=level)
            except Exception as exc:  # ConnectionError, ValueError, TimeoutError, ...
                raise ResourceError(
                    f"{_address_field(address)}: cannot connect to Ray at {address}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from exc
        else:
            temp_dir = tempfile.mkdtemp(prefix="remem-ray-", dir="/tmp")
            # One machine is never drained for preemption: without the watcher each Train run starts
            # one process fewer (processes inherit this through the raylet ray.init starts).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Every process of this Ray finds its State API here, not by auto-detection, which
            # fails when another Ray runs on the host: Train's placement-group cleaner then never
            # frees what runs the scheduler stopped held, and later runs wait for it forever.
            stack.enter_context(_env_var(API_SERVER_ADDRESS_ENV, ""))
            for attempt in range(1, DASHBOARD_PORT_TRIES + 1):
                dashboard_port = _dashboard_port()
                os.environ[API_SERVER_ADDRESS_ENV] = f"http://127.0.0.1:{dashboard_port}"
                try:
                    context = ray.init(
                        _node_ip_address="127.0.0.1",
                        include_dashboard=True,
                        dashboard_host="127.0.0.1",
                        dashboard_port=dashboard_port,
                        _temp_dir=temp_dir,
                        log_to_driver=True,
                        configure_logging=True,
                        logging_level=level,
                    )
                    break
                except Exception as exc:  # the port went to another process before the dashboard bound it
                    ray.shutdown()
                    if attempt == DASHBOARD_PORT_TRIES or not _port_taken(exc):
                        _keep_logs_if_any(temp_dir)
                        raise
        stack.callback(ray.shutdown)
        _ray_console_level(verbose)
        try:
            yield context.dashboard_url or None  # where Ray's dashboard is, for the console
        except BaseException as exc:
            if isinstance(exc, UserInputError) and not getattr(exc, _TRIALS_MAY_HAVE_RUN, False):
                # refused before any trial ran: Ray's logs explain nothing
                ray.shutdown()  # first: the temp folder goes once Ray is down
                _remove_temp_dir(temp_dir)
                raise
            if temp_dir:  # its session logs are what explains a failed sweep: keep them, say where
                print(f"remem: Ray's logs of this sweep are in {temp_dir}/session_latest/logs", file=sys.stderr)
            raise
    _remove_temp_dir(temp_dir)


_TRIALS_MAY_HAVE_RUN = "remem_trials_may_have_run"


@contextlib.contextmanager
def trials_may_run() -> Iterator[None]:
    """Around the part of a driver's run where trials may run: a storage error or a lost driver
    lease raised there (UserInputErrors, as a refusal at the start is) comes after trials ran,
    and ray_session keeps Ray's logs for it and says where, as for any failed sweep."""
    try:
        yield
    except UserInputError as exc:
        setattr(exc, _TRIALS_MAY_HAVE_RUN, True)
        raise


def _keep_logs_if_any(temp_dir: str) -> None:
    """A Ray that would not start: its logs say why, so a folder with any stays and is named."""
    if any(Path(temp_dir).iterdir()):
        print(f"remem: Ray's logs of this start are in {temp_dir}", file=sys.stderr)
    else:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _remove_temp_dir(temp_dir: str | None) -> None:
    if temp_dir and os.environ.get("REMEM_KEEP_RAY_LOGS") != "1":
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _tune_console(verbose: bool):
    """Quiet: Tune's legacy output engine at verbose=0 prints nothing (the new engine still draws
    its experiment box and a TensorBoard hint into Ray's temp folder); ProgressCallback reports."""
    if verbose:
        yield
        return
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


@contextlib.contextmanager
def _stable_working_dir():
    """Run the sweep from a folder that stays for its whole length, then come back.

    Inside a Ray job the working dir is the job's runtime-env package, which Ray can remove
    while the driver still runs (seen once the trials sharing it had exited), and Tune
    resolves paths against the cwd at the end. The spec holds only absolute local paths by
    now, so nothing depends on the old cwd; a script calling run_sweep gets its cwd back.
    """
    previous = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the old folder may be gone (a removed job package)
            os.chdir(previous)


def _identified(spec: SweepSpec) -> tuple[SweepSpec, list[str]]:
    """The spec with what its inputs hold now (remem_ray/inputs.py), and lines on those unread."""
    if spec.data.name == "imagefolder" and str(spec.data.root).startswith("s3://"):
        say(f"sweep {spec.name}: listing {spec.data.root}: what it holds keys the teachers")
    return with_input_identities(spec)


def _begun_with(layout: SweepLayout) -> dict[str, str | None] | None:
    """The identities a sweep's inputs had as it began; None for a sweep begun before them."""
    if not layout.experiment.is_file(INPUTS_FILE):
        return None
    try:
        return json.loads(layout.experiment.read_text(INPUTS_FILE))
    except json.JSONDecodeError:
        raise UserInputError(f"sweep: {layout.experiment.uri(INPUTS_FILE)} is not what this sweep began with") from None


def _trainable(spec: SweepSpec):
    from ray import tune

    from remem_ray.sweep.trial import remem_trial

    keep_credentials_out_of_runtime_envs()
    trainable = tune.with_parameters(remem_trial, sweep=spec.model_dump(mode="json"))
    return tune.with_resources(trainable, spec.sweep.resources.trial_resources())


def resume_command(folder_uri: str, endpoint: str | None) -> str:
    """The command that resumes the sweep in `folder_uri`, from any working directory."""
    return f"remem sweep resume {folder_uri}" + (f" --endpoint {endpoint}" if endpoint else "")


def _check_new(layout: SweepLayout, endpoint: str | None) -> None:
    """Refuse a name whose sweep can be resumed. A folder without Tune's experiment (a run stopped
    between writing its spec and creating the Tuner, which writes tuner.pkl) holds nothing to
    resume: `run` starts it over (a driver still running it holds the driver lease, which the new
    one then waits for and is refused)."""
    if layout.experiment.exists(TUNER_FILE):
        raise UserInputError(
            f"name: sweep {layout.name!r} already exists at {layout.experiment.uri()}; "
            f"resume it with `{resume_command(layout.experiment.uri(), endpoint)}` or pick another --name"
        )


def run_sweep(spec: SweepSpec, address: str | None = None, verbose: bool = False) -> SweepSummary:
    """Run a new sweep to the end; the console shows epochs, trial events and progress (all of
    Ray's output with `verbose`), `<sweep folder>/sweep.log` keeps everything."""
    address = _cluster_address(address)
    check_spec(spec, inputs_here=address is None)  # a cluster's trials read files on its nodes
    preflight_config(spec.storage)  # endpoint, credentials, bucket, writable root: before Ray is imported
    storage = Storage.from_config(spec.storage)
    layout = SweepLayout(storage, spec.name)
    _check_new(layout, spec.storage.endpoint)
    from ray import tune

    from remem_ray.sweep.progress import ProgressCallback
    from remem_ray.sweep.trial import trial_dirname

    export = StudyExport(spec, layout)
    trials = f"{spec.sweep.num_samples} trial{'s' if spec.sweep.num_samples != 1 else ''}"
    again = functools.partial(_check_new, layout, spec.storage.endpoint)  # a driver waited for may have made it
    identified, unread = _identified(spec)
    driving_it = _driving(identified, layout, address, verbose, trials, export, after_taking=again, notes=unread)
    with driving_it as (console, sized, driving):
        # first, then the Tuner (it writes tuner.pkl): a sweep with an experiment always has its spec.
        # As written (gpus_per_worker: auto stays auto): a resume sizes its shares on its cluster; and
        # what its inputs held as it began (its keys), which a resume keeps and checks.
        layout.experiment.write_text(SWEEP_SPEC_FILE, json.dumps(spec.model_dump(mode="json"), indent=2))
        layout.experiment.write_text(INPUTS_FILE, json.dumps(identities(identified), indent=2))
        tuner = tune.Tuner(
            _trainable(sized),
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(sized),  # bounds concurrency by GPU slots (sweep/slots.py)
                scheduler=build_scheduler(spec),
                num_samples=spec.sweep.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=layout.root.child("sweeps").path(),
                storage_filesystem=storage.fs,
                failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
                verbose=1 if verbose else 0,
                callbacks=[ProgressCallback(expected_trials(spec))],
            ),
        )
        with _tune_console(verbose):
            tuner.fit()
        summary = _finish(spec, layout, console, export, driving)
    return summary


@contextlib.contextmanager
def _driving(
    spec: SweepSpec,
    layout: SweepLayout,
    address: str | None,
    verbose: bool,
    what: str,
    export: StudyExport,
    after_taking: Callable[[], None] | None = None,
    notes: Sequence[str] = (),
):
    """The driver's run of a sweep: a stable cwd, Ray, the sweep's driver lease, the console and
    log (and the study's copy); yields the console, the spec the trials run (its `auto` GPU shares
    sized, sweep/gpu_shares.py), and the held lease (sweep/driver_lease.py). `spec`: its inputs
    identified (remem_ray/inputs.py); `notes`: lines for the console once it is up."""
    from remem_ray.sweep.driver_lease import driving_lease
    from remem_ray.sweep.gpu_shares import (
        fit_concurrency,
        probe_on_cluster,
        refuse_auto_without_gpus,
        refuse_what_this_machine_cannot_hold,
        resolve_gpu_shares,
        sizing_record,
        slot_measure,
    )
    from remem_ray.sweep.progress import driver_line, sweep_console
    from remem_ray.sweep.run_slots import run_slot_book
    from remem_ray.sweep.slots import driver_limit

    with _stable_working_dir(), ray_session(address, verbose) as dashboard:
        # before the console: its log is the sweep's first write
        if address:
            preflight_from_cluster(spec, address)
        nodes = cluster_nodes()
        refuse_auto_without_gpus(spec, nodes)
        if not address:  # a private Ray: no autoscaler will add what it lacks
            refuse_what_this_machine_cannot_hold(spec, nodes)
        # one driver per sweep, taken before the first write (the console's log); its lines go
        # to the console once there is one
        with (
            driving_lease(
                layout,
                spec.sweep.lease_stale_after_s,
                driver_line,
                after_taking=after_taking,
                resume=resume_command(layout.experiment.uri(), spec.storage.endpoint),
            ) as driving,
            sweep_console(layout.experiment, verbose, on_tick=export, may_write=driving.holds) as console,
        ):
            measured: list = []

            def probe(spec: SweepSpec, roles: list[str]):
                console.show(
                    f"sweep {spec.name}: measuring a training step of the {' and '.join(roles)} on one GPU, "
                    f"to size their shares (gpus_per_worker: auto)"
                )
                measured.extend(probe_on_cluster(spec, roles))
                return measured

            sized, lines = resolve_gpu_shares(spec, nodes, probe)
            if lines:  # the probe may have brought a GPU node up
                nodes = cluster_nodes()
            sized, line = fit_concurrency(spec, sized, nodes)
            measure, budget_line = slot_measure(sized, nodes)
            if lines:  # only this driver writes it, before any trial reads the sweep folder
                record = sizing_record(sized, measured, measure)
                layout.experiment.write_text(GPU_SHARES_FILE, json.dumps(record, indent=2))
            for shown in [*lines, line, budget_line]:
                if shown:
                    console.show(shown)
            console.show(
                f"sweep {spec.name}: {what}, {measure.describe()}; "
                f"log {layout.experiment.uri(LOG_FILE)}; Ray dashboard {_url(dashboard)}"
            )
            notices = [*notes, unused_gpus_note(sized, sum(n.gpus for n in nodes))]
            if address:  # a private Ray without it was refused above
                notices.append(driver_resource_note(sized, [node.get("Resources") or {} for node in _alive_nodes()]))
            for note in notices:
                if note:
                    console.show(note)
            # a resumed sweep's searcher comes back with the measure it was first sized with; the
            # run slots hold its Train runs to the same measure
            with driver_limit(spec, measure), run_slot_book(spec, measure), trials_may_run():
                yield console, sized, driving


def _alive_nodes() -> list[dict]:
    """Ray's records of the connected cluster's alive nodes."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def cluster_nodes():
    """The connected cluster's alive nodes: GPUs, CPUs and GPU model of each."""
    from remem_ray.sweep.gpu_shares import NodeResources

    found = []
    for node in _alive_nodes():
        resources = node.get("Resources") or {}
        kinds = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
        found.append(NodeResources(gpus, cpus, kinds[0] if kinds else None))
    return found


def driver_resource_note(spec: SweepSpec, node_resources: list[dict]) -> str | None:
    """A line when no node of the cluster has the trials' driver_resource: every trial waits for
    one, and the console said only "0 running, N pending" (a typo, a head started without it)."""
    name = spec.sweep.resources.driver_resource
    if not name or any(name in resources for resources in node_resources):
        return None
    return (
        f"sweep.resources.driver_resource: no node of this cluster has the resource {name!r} now, so the "
        f"trials wait for one (the head defines it: ray start --head --resources '{{\"{name}\": 64}}', as in "
        f"cluster/); they start only if an autoscaler node type that defines it comes up"
    )


def unused_gpus_note(spec: SweepSpec, cluster_gpus: float) -> str | None:
    """A line when the cluster has GPUs that a role's Train runs do not ask for: Ray hides GPUs from
    every worker that did not ask for one, so those runs train on CPUs beside idle GPUs."""
    res = spec.sweep.resources
    without = [role for role in ("teacher", "student") if not getattr(res, role).gpus_per_worker]
    if cluster_gpus <= 0 or spec.device == "cpu" or not without:
        return None
    fields = " and ".join(f"sweep.resources.{role}.gpus_per_worker" for role in without)
    return (
        f"note: the cluster has {cluster_gpus:g} GPU(s) but {fields} {'is' if len(without) == 1 else 'are'} 0: "
        f"those Train runs use CPUs only (set 1, 0.5 for two runs per GPU, or auto)"
    )


CLUSTER_PREFLIGHT_TIMEOUT_S = 60.0  # the storage's checks; each s3:// input adds INPUT_CHECK_S
INPUT_CHECK_S = 30.0  # two attempts of storage.preflight_input, with room


def _preflight_here(storage: dict, inputs: list[tuple[str, str]]) -> str | None:
    """The storage preflight where this runs (a node of the cluster), then a look at the spec's
    s3:// inputs (weights, an image folder): the first one line, or None."""
    from remem_ray.config import StorageConfig
    from remem_ray.spec_checks import check_s3_inputs

    try:
        config = StorageConfig.model_validate(storage)
        preflight_config(config)
        check_s3_inputs(inputs, config.endpoint, config.region)
    except ResourceError as exc:
        return str(exc)
    return None


def preflight_from_cluster(spec: SweepSpec, address: str) -> None:
    """The storage preflight again, and a look at the spec's s3:// inputs, from every alive node
    of the cluster at `address`: trials reach the storage with the nodes' credentials and network,
    never the driver's (which are not sent along), so a node group that cannot use the root (or
    read the weights) would fail every trial attempt placed on it. Nodes that do not run the
    check within a minute are not waited for, nor are nodes that left the cluster meanwhile;
    nodes an autoscaler starts later are not checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0)(_preflight_here)
    storage = spec.storage.model_dump(mode="json")  # the root, endpoint and region: no keys
    inputs = s3_inputs(spec)
    pending = {}
    for node in _alive_nodes():
        on_node = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        where = f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
        pending[check.options(scheduling_strategy=on_node).remote(storage, inputs)] = (node["NodeID"], where)
    budget = CLUSTER_PREFLIGHT_TIMEOUT_S + INPUT_CHECK_S * len(inputs)
    _, late_refs = ray.wait(list(pending), num_returns=len(pending), timeout=budget)
    late = set(late_refs)
    for ref in late:
        ray.cancel(ref, force=True)
    problems: dict[str, list[str]] = {}  # message -> the nodes that gave it
    gone = []
    for ref, (node_id, where) in pending.items():
        if ref in late:
            continue
        try:
            problem = ray.get(ref)
        except ray.exceptions.RayError as exc:  # remem_ray missing on the node, the node left, ...
            if node_id not in {n["NodeID"] for n in _alive_nodes()}:
                gone.append(where)
                continue
            cause = getattr(exc, "cause", None) or exc
            problem = (
                f"--address: the storage and input checks could not run: {type(cause).__name__}: "
                f"{one_line(cause)[:300]}"
            )
        if problem:
            problems.setdefault(problem, []).append(where)
    if problems:
        problem, nodes = next(iter(problems.items()))
        more = f"; {len(problems) - 1} other problem(s) on other nodes" if len(problems) > 1 else ""
        raise ResourceError(
            f"{problem} (checked from a node of the Ray cluster at {address}, {', '.join(nodes)}{more}: trials "
            f"reach the storage with the cluster's credentials and network, not this machine's)"
        )
    if late or gone:
        print(
            f"remem: the storage{' and the s3:// inputs' if inputs else ''} were not checked from "
            f"{len(late) + len(gone)} of the {len(pending)} nodes of "
            f"the Ray cluster at {address} (no answer within {budget:.0f} s, or left the "
            f"cluster); going on",
            file=sys.stderr,
        )


def _url(address: str | None) -> str:
    if not address:
        return "off"
    return address if "://" in address else f"http://{address}"


def _finish(spec: SweepSpec, layout: SweepLayout, console, export: StudyExport, driving: DriverLease) -> SweepSummary:
    """The last progress line, summary.json, the report and the Optuna study's copy, as the sweep
    ends; each written only while this driver still holds the sweep's lease (`driving`)."""
    from remem_ray.sweep.progress import final_progress

    driving.settle()  # a loss from now on stops no Tune run: it is checked before each write
    driving.raise_if_lost()
    trials = load_trials(layout)
    final_progress(trials, expected_trials(spec))
    summary = summarize(spec, layout, trials)
    if summary.space_exhausted:
        console.show(
            f"search space exhausted: all {summary.space_size} distinct points ran "
            f"(sweep.num_samples {spec.sweep.num_samples}); no point runs twice"
        )
    driving.raise_if_lost()
    write_summary(layout, summary)
    driving.raise_if_lost()
    write_report(summary, layout)
    driving.raise_if_lost()
    url = export()  # the study's last copy (none made if the last tick's is current)
    driving.raise_if_lost()  # lost meanwhile: this driver's results are not the sweep's to report
    if url:
        console.show(f"optuna study {spec.name!r}: {url} (`remem sweep dashboard {spec.name}` serves it)")
    return summary


def locate_sweep(name_or_uri: str, storage_root: str | None = None, endpoint: str | None = None) -> SweepSpec:
    """The stored spec of a sweep given by name (under the storage root) or by its folder's URI.

    Only a sweep whose folder is where its own spec says its storage root is gets accepted:
    resume unpickles Tune state, so it must come from the root this spec configured.
    """
    if "://" in name_or_uri and not name_or_uri.startswith("s3://"):
        raise UserInputError(f"sweep: {name_or_uri} is neither a sweep's name, its folder's path nor an s3:// URI")
    by_uri = "/" in name_or_uri
    root = name_or_uri.rstrip("/") if by_uri else storage_root or "./remem-results"
    # shared with status, best and report, which only read: prove S3 usable, not a local root writable
    preflight(
        root, endpoint, root_field="sweep" if by_uri else "--storage", endpoint_field="--endpoint", writable=False
    )
    folder = Storage(root, endpoint) if by_uri else Storage(root, endpoint).child("sweeps", name_or_uri)
    if not folder.is_file(SWEEP_SPEC_FILE):
        raise UserInputError(f"sweep: no sweep at {folder.uri()} ({SWEEP_SPEC_FILE} missing)")
    try:
        raw = json.loads(folder.read_text(SWEEP_SPEC_FILE))
        storage = raw.setdefault("storage", {})
    except (json.JSONDecodeError, AttributeError):
        raise UserInputError(f"sweep: {folder.uri(SWEEP_SPEC_FILE)} is not a sweep spec") from None
    if endpoint and not storage.get("endpoint"):
        storage["endpoint"] = endpoint
    spec = parse_spec(SweepSpec, raw)
    expected = SweepLayout.of(spec).experiment.uri()
    if expected != folder.uri():
        raise UserInputError(
            f"sweep: {folder.uri()} is not under its configured storage root "
            f"({expected}); restore only from the storage the sweep was run on"
        )
    return spec


def resume_sweep(spec: SweepSpec, address: str | None = None, verbose: bool = False) -> SweepSummary:
    address = _cluster_address(address)
    # the stored spec against this machine (a weights file the first driver had, say); not the
    # settings a new run refuses: a resume cannot change them, and they ran once
    check_spec(spec, sweep_settings=False, inputs_here=address is None)
    preflight_config(spec.storage)  # resume writes: the root must be writable too
    from ray import tune

    storage = Storage.from_config(spec.storage)
    layout = SweepLayout(storage, spec.name)
    path = layout.experiment.path()
    if not tune.Tuner.can_restore(path, storage_filesystem=storage.fs):
        from remem_ray.sweep.driver_lease import driving_holder

        starting = driving_holder(layout)
        if starting:
            raise UserInputError(
                f"sweep: {layout.experiment.uri()} is being started by {starting} (no Tune experiment yet): "
                f"wait for it, or run it again with `remem sweep run` if that driver has ended"
            )
        raise UserInputError(
            f"sweep: {layout.experiment.uri()} stopped before its first trial (no Tune experiment in it): "
            f"start it again with `remem sweep run`"
        )
    identified, unread = as_begun(spec, _begun_with(layout))  # a changed input refused before Ray starts
    export = StudyExport(spec, layout)
    with _driving(identified, layout, address, verbose, "resuming", export, notes=unread) as (console, sized, driving):
        # under the driver lease (one that lost it stops)
        moved = name_newest_state_last(layout.experiment, staging_dirs(spec.name))
        if moved:
            console.show(moved)
        tuner = tune.Tuner.restore(
            path, _trainable(sized), resume_unfinished=True, resume_errored=True, storage_filesystem=storage.fs
        )
        with _tune_console(verbose):
            tuner.fit()
        summary = _finish(spec, layout, console, export, driving)
    return summary


def sweep_summary(spec: SweepSpec) -> SweepSummary:
    """Status from storage alone (no Ray needed)."""
    return summarize(spec, SweepLayout.of(spec))
