"""One suite for every storage backend (local folder and S3), like Optuna's storage tests."""

import pytest

from remem_ray.errors import ResourceError
from remem_ray.storage import Storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3")
    return Storage(f"s3://{s3['bucket']}/prefix", endpoint=s3["endpoint"])


def test_write_read_exists_list(store):
    assert not store.exists("a/b.txt")
    store.write_text("a/b.txt", "hello")
    store.write_bytes("a/c.bin", b"\x00\x01")
    assert store.exists("a/b.txt") and store.is_file("a/b.txt")
    assert store.read_text("a/b.txt") == "hello"
    assert store.list_dir("a") == ["b.txt", "c.bin"]
    assert store.list_dir("missing") == []


def test_overwrite_replaces_whole_object(store):
    store.write_text("x.json", "first version, longer")
    store.write_text("x.json", "second")
    assert store.read_text("x.json") == "second"


def test_upload_download_and_delete_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "sub" / "two.txt").write_text("2")
    store.upload_dir(src, "folder")
    out = store.download_dir("folder", tmp_path / "out")
    assert (out / "one.txt").read_text() == "1" and (out / "sub" / "two.txt").read_text() == "2"
    child = store.child("folder")
    assert child.read_text("sub/two.txt") == "2"
    assert child.uri("sub").startswith(store.uri("folder"))
    store.delete_file("folder/one.txt")
    store.delete_file("folder/one.txt")  # already gone: no error
    assert not store.exists("folder/one.txt") and store.exists("folder/sub/two.txt")
    store.delete_dir("folder")
    assert not store.exists("folder/sub/two.txt")


def test_missing_object_error_names_the_uri(store):
    with pytest.raises(ResourceError, match=r"^storage: cannot read .*nothing-here"):
        store.read_bytes("nothing-here")


def test_unreachable_endpoint_is_a_clear_error():
    store = Storage("s3://bucket/p", endpoint="http://127.0.0.1:9")
    with pytest.raises(ResourceError, match=r"^storage: cannot"):
        store.exists("x")
