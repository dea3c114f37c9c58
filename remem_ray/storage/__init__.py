"""The storage layer: a local folder or s3://bucket/prefix through pyarrow.fs, with boto3 where
pyarrow cannot say it (a whole object in one GET, conditional writes, plain deletes).

Credentials come from the AWS default chain (environment, AWS_PROFILE and its files, the instance
role), which pyarrow and boto3 share; nothing here takes or writes keys.
"""

from remem_ray.storage.cache import cache_root, fetch_to_cache
from remem_ray.storage.fs import S3_MAX_ATTEMPTS, Storage, one_line, s3_filesystem, split_s3_uri
from remem_ray.storage.preflight import PREFLIGHT_TIMEOUT_S, bucket_error, preflight, preflight_config

__all__ = [
    "PREFLIGHT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "Storage",
    "bucket_error",
    "cache_root",
    "fetch_to_cache",
    "one_line",
    "preflight",
    "preflight_config",
    "s3_filesystem",
    "split_s3_uri",
]
