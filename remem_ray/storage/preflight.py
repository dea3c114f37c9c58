"""Preflight: prove a storage root usable before anything is written or Ray starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from remem_ray.errors import ResourceError
from remem_ray.storage.fs import default_region, endpoint_from_env, one_line, split_s3_uri

PREFLIGHT_TIMEOUT_S = 3.0  # connect timeout of the preflight: a dead endpoint fails in seconds, not minutes


# --------------------------------------------------------------------------- preflight
#
# Runs before anything is written and before Ray starts, so a bad root, a dead endpoint,
# missing credentials or a missing bucket end in one line naming the field, not in a trace
# from deep inside a trial. It only reads: nothing is created, locally or in the bucket.


def preflight(
    root: str,
    endpoint: str | None = None,
    region: str | None = None,
    *,
    root_field: str = "storage.root",
    endpoint_field: str = "storage.endpoint",
    writable: bool = True,
) -> None:
    """Prove a storage root usable, or raise a one-line ResourceError naming the field.

    s3:// roots: the endpoint answers, credentials resolve and the bucket exists and lets us in.
    Local roots (only when `writable`): the root is a folder, or can be created as one.
    """
    if root.startswith("s3://"):
        _preflight_s3(root, endpoint, region or default_region(), root_field, endpoint_field)
    elif writable:
        _preflight_local(root, root_field)


def preflight_config(cfg, writable: bool = True) -> None:
    """preflight() for a spec's StorageConfig (storage.root, storage.endpoint, storage.region)."""
    preflight(cfg.root, cfg.endpoint, cfg.region, writable=writable)


INPUT_CHECK_ATTEMPTS = 2  # a quick look, not the minute of retries a run's own reads ride out
INPUT_CHECK_REQUEST_S = 10.0  # an endpoint that takes the connection but never answers: 2 x 10 s


def preflight_input(uri: str, endpoint: str | None, region: str | None, field: str) -> None:
    """An s3:// input (weights, an image folder) is there, in seconds: the endpoint answers, then
    one lookup of the object. Only what the run's own fetch does (no bucket listing, no credential
    check of our own): a read-only grant on the object, or a public one, passes."""
    from remem_ray.storage.cache import fetchable
    from remem_ray.storage.fs import s3_filesystem

    endpoint, endpoint_field = _endpoint_named(endpoint, field)
    if endpoint:
        _check_endpoint(endpoint, endpoint_field)
    quick = s3_filesystem(endpoint, region, max_attempts=INPUT_CHECK_ATTEMPTS, request_timeout_s=INPUT_CHECK_REQUEST_S)
    fetchable(uri, endpoint, field, region, fs=quick)


def _preflight_local(root: str, field: str) -> None:
    path = Path(root).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ResourceError(f"storage: {field} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ResourceError(f"storage: {field} {path} is not writable")
        return
    ancestor = next(p for p in path.parents if p.exists())  # "/" always exists
    if not ancestor.is_dir():
        raise ResourceError(f"storage: cannot create {field} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ResourceError(f"storage: cannot create {field} {path}: {ancestor} is not writable")


def _preflight_s3(root: str, endpoint: str | None, region: str, root_field: str, endpoint_field: str) -> None:
    endpoint, endpoint_field = _endpoint_named(endpoint, endpoint_field)
    if endpoint:  # AWS itself is left to the bucket check: its endpoint depends on region and proxies
        _check_endpoint(endpoint, endpoint_field)
    session = _aws_session(root, root_field)
    _check_bucket(session, root, endpoint, region, root_field)


def _endpoint_named(endpoint: str | None, field: str) -> tuple[str | None, str]:
    """(the endpoint in use, what names it): the one given under `field`, else the environment's
    under its variable (errors then name what the user set)."""
    if not endpoint and (found := endpoint_from_env()):
        return found
    return endpoint, field


def _check_endpoint(endpoint: str, field: str) -> None:
    """A TCP connect with a short timeout: pyarrow would retry a dead endpoint for minutes."""
    url = urlsplit(endpoint)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a port that is not a number or out of range
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        # --endpoint and AWS_ENDPOINT_URL(_S3) reach here unvalidated (the spec's field is checked earlier)
        raise ResourceError(f"storage: {field} must look like http://host:port or https://host, got {endpoint!r}")
    try:
        socket.create_connection((url.hostname, port), timeout=PREFLIGHT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise ResourceError(f"storage: cannot reach the S3 endpoint {endpoint} ({field}): {reason}") from None


def _aws_session(root: str, field: str):
    """A boto3 session whose credential chain resolves: environment, profile files or an instance role.

    boto3's chain matches what pyarrow uses; its instance-metadata lookup times out after 1 s
    off EC2 (and is skipped with AWS_EC2_METADATA_DISABLED=true).
    """
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:  # e.g. AWS_PROFILE names a missing profile
        raise ResourceError(f"storage: cannot load AWS credentials for {field} {root}: {one_line(exc)}") from None
    if credentials is None:
        raise ResourceError(
            f"storage: no AWS credentials for {field} {root}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role provides them"
        )
    return session


def _check_bucket(session, root: str, endpoint: str | None, region: str, field: str) -> None:
    """List at most one key under the root: the call the storage layer itself needs first.

    Not HeadBucket: least-privilege policies often grant ListBucket only under a prefix,
    which HEAD (no prefix) fails although the sweep would work.
    """
    import botocore.config
    import botocore.exceptions

    bucket, _, prefix = split_s3_uri(root).partition("/")
    config = botocore.config.Config(
        connect_timeout=PREFLIGHT_TIMEOUT_S, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}
    )
    where = f" at {endpoint}" if endpoint else ""
    try:  # boto3 refuses some endpoints the URL check lets by (a host name with "_", as compose names go)
        client = session.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)
    except (ValueError, botocore.exceptions.BotoCoreError) as exc:
        raise ResourceError(
            f"storage: cannot address bucket {bucket!r}{where} for {field} {root}: {one_line(exc)}"
        ) from None
    if not endpoint and not _on_aws(client):
        # a profile's endpoint_url (the environment's was taken above): boto3 goes there, pyarrow,
        # which reads and writes every checkpoint, to AWS
        raise ResourceError(
            f"storage.endpoint: your AWS profile sends S3 requests to {client.meta.endpoint_url}, which the "
            f"checkpoints' client does not read: set storage.endpoint: {client.meta.endpoint_url} "
            f"(or AWS_ENDPOINT_URL_S3) for {field} {root}"
        )
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
    except botocore.exceptions.ClientError as exc:
        raise bucket_error(exc, bucket, root, field, where) from None
    except botocore.exceptions.BotoCoreError as exc:  # no route to AWS, timeouts, bad TLS
        raise ResourceError(
            f"storage: cannot reach bucket {bucket!r}{where} for {field} {root}: {one_line(exc)}"
        ) from None
    if _on_aws(client):  # other S3 servers ignore regions, or name one of their own
        located = _bucket_region(client, bucket)
        if located and located != region:
            # boto3 follows S3's redirect to the bucket's region, so the listing passed; pyarrow, with
            # which every run reads and writes, does not: each trial failed on an HTTP 301
            raise ResourceError(
                f"storage.region: bucket {bucket!r} of {field} {root} is in {located}, not {region}: set "
                f"storage.region: {located} in the spec (or AWS_REGION)"
            )


def _on_aws(client) -> bool:
    """Whether boto3 addresses AWS itself (no storage.endpoint nor AWS_ENDPOINT_URL(_S3), and none
    of boto3's own endpoint settings either: a profile's endpoint_url may name a MinIO)."""
    host = urlsplit(client.meta.endpoint_url or "").hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _bucket_region(client, bucket: str) -> str | None:
    """The bucket's region as S3 states it (HeadBucket's x-amz-bucket-region, sent with a redirect
    or a refusal too); None where it does not say."""
    import botocore.exceptions

    try:
        response = client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        response = exc.response
    except botocore.exceptions.BotoCoreError:
        return None
    return (response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("x-amz-bucket-region")


def bucket_error(exc, bucket: str, root: str, field: str, where: str = "") -> ResourceError:
    """The one-line error for a failed request to the bucket (a botocore ClientError)."""
    status = str(exc.response.get("Error", {}).get("Code", "")) or "?"
    if status in ("404", "NoSuchBucket", "NotFound"):
        return ResourceError(f"storage: bucket {bucket!r} of {field} {root} does not exist{where}")
    if status in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return ResourceError(
            f"storage: access denied to bucket {bucket!r} of {field} {root}{where} ({status}): "
            f"check the credentials and the bucket's policy"
        )
    return ResourceError(f"storage: cannot use bucket {bucket!r} of {field} {root}{where}: {one_line(exc)}")
