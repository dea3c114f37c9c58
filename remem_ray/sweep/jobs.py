"""Sweeps on a remote Ray cluster through the Ray Jobs API (the dashboard's HTTP address).

The job runs `python -m remem_ray.cli sweep run sweep.yaml` on the cluster, with the validated
spec shipped as the job's working dir. Only non-secret storage settings travel as environment
variables (endpoint, region): credentials on a cluster come from its instance role, never
from the submitting machine, because runtime_env values are visible in the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from remem_ray.config import SweepSpec
from remem_ray.errors import ResourceError, UserInputError

FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
# `remem sweep stop`: Ray's job supervisor sends SIGTERM and SIGKILLs after 3 s, which ended a
# driver without Tune's last save, the summary or its leases' release. SIGINT is Ctrl-C: the
# driver stops its trials and writes all that (a minute or two on S3), then ends.
STOP_WAIT_S = 300
STOP_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
_ADDRESS = re.compile(r"https?://[^/\s:@]+(:\d{1,5})?/?")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def check_address(address: str) -> None:
    if not _ADDRESS.fullmatch(address or ""):
        raise UserInputError(f"--address: expected the Ray dashboard as http://HOST:PORT, got {address!r}")


# Ray's client takes these over the address it is given ("just like ray.init()"): a GCS address
# exported for ray.init sent `sweep logs --address http://HEAD:8265` to wait 40 s on the GCS
ADDRESS_OVERRIDES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@contextlib.contextmanager
def _address_as_given():
    """While the client is made: the --address given (or RAY_ADDRESS itself, when it is what the
    CLI took for --address) is the one Ray uses."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_OVERRIDES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def jobs_client(address: str):
    """A JobSubmissionClient for http(s)://HEAD:8265; bad or unreachable addresses are user errors."""
    check_address(address)
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_as_given():
            return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError, requests errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"--address: cannot reach the Ray dashboard at {address}: {reason}") from None


def submit_sweep(spec: SweepSpec, address: str, ship_package: bool = False) -> str:
    """Submit a validated sweep as a Ray job; returns the job id."""
    return _submitted(["sweep", "run", "sweep.yaml"], spec.name, address, ship_package, spec)


def submit_resume(sweep: str, address: str, endpoint: str | None = None, ship_package: bool = False) -> str:
    """Submit `remem sweep resume SWEEP` as a Ray job (SWEEP: the sweep folder's URI, as the
    cluster reaches it); returns the job id. Storage is read there, not here, as for a new sweep."""
    name = sweep.rstrip("/").rsplit("/", 1)[-1]
    words = ["sweep", "resume", sweep, *(["--endpoint", endpoint] if endpoint else [])]
    return _submitted(words, name, address, ship_package)


def _submitted(words: list[str], name: str, address: str, ship_package: bool, spec: SweepSpec | None = None) -> str:
    client = jobs_client(address)
    if spec is None:  # a resume: storage holds the sweep, nothing to ship
        return _submit(client, words, name, address, None, ship_package)
    staging = Path(tempfile.mkdtemp(prefix="remem-job-"))
    try:  # submit_job has uploaded the working dir to the cluster by the time it returns
        (staging / "sweep.yaml").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        return _submit(client, words, name, address, staging, ship_package)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _submit(client, words: list[str], name: str, address: str, staging: Path | None, ship_package: bool) -> str:
    """staging: the job's working dir (the spec); None for a resume, which ships nothing."""
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and "@" not in os.environ[k]}
    runtime_env: dict = {"env_vars": {**forwarded, **STOP_ENV}}
    if staging is not None:
        runtime_env["working_dir"] = str(staging)
    if ship_package:
        import remem_ray

        runtime_env["py_modules"] = [str(Path(remem_ray.__file__).parent)]
    submission_id = f"remem-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return client.submit_job(
            entrypoint=shlex.join(["python", "-m", "remem_ray.cli", *words]),
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"remem_sweep": name},
        )
    except Exception as exc:
        raise ResourceError(
            f"--address: job submission to {address} failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def _asked(what: str, call, *args):
    """One call to the dashboard; its failure is one line naming the address."""
    try:
        return call(*args)
    except Exception as exc:  # requests' errors, RuntimeError from the client
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"--address: could not {what}: {reason}") from None


def _known_job(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except Exception as exc:  # the client says a missing job with a 404; anything else is the dashboard's
        if "404" in str(exc) or "does not exist" in str(exc):
            raise UserInputError(f"job: no job {job_id!r} on this cluster") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"--address: could not ask for job {job_id!r}: {reason}") from None


def job_logs(address: str, job_id: str, follow: bool = False, out=None) -> str:
    """Print the job's logs; with follow, keep printing until the job ends. Returns its status."""
    import sys

    out = out or sys.stdout
    client = jobs_client(address)
    _known_job(client, job_id)
    if follow:
        # the dashboard streams each new chunk once and ends the stream after the job's last lines
        # (it reads its status, then the log to its end); polling the whole log every 2 s grew
        # with the log: megabytes a read in a long sweep. A stream that ends with the job still
        # running (the dashboard restarted) is opened again, from its start: what was shown is skipped.
        shown = 0
        while True:
            shown = _asked("follow the job's logs", asyncio.run, _stream_logs(client, job_id, out, shown))
            status = str(_asked("read the job's status", client.get_job_status, job_id).value)
            if status in TERMINAL:
                return status
            time.sleep(2.0)
    # the status first: logs read after it said the job ended hold its last lines
    status = str(_asked("read the job's status", client.get_job_status, job_id).value)
    out.write(_asked("read the job's logs", client.get_job_logs, job_id))
    out.flush()
    return status


async def _stream_logs(client, job_id: str, out, skip: int) -> int:
    """Print the job's log stream past its first `skip` characters; returns how far it has shown."""
    seen = 0
    async for chunk in client.tail_job_logs(job_id):
        new = chunk[max(0, skip - seen) :]
        seen += len(chunk)
        if new:
            out.write(new)
            out.flush()
    return max(seen, skip)


def stop_job(address: str, job_id: str) -> tuple[str, bool]:
    """Ask Ray to stop the job: (its status now, whether Ray sends it SIGINT: a job `submit_sweep`
    made, or one given RAY_JOB_STOP_SIGNAL=SIGINT; others get SIGTERM, then SIGKILL 3 s later)."""
    client = jobs_client(address)
    info = _known_job(client, job_id)
    env = (getattr(info, "runtime_env", None) or {}).get("env_vars") or {}
    _asked("stop the job", client.stop_job, job_id)
    return str(_asked("read the job's status", client.get_job_status, job_id).value), env.get(
        "RAY_JOB_STOP_SIGNAL"
    ) == "SIGINT"
