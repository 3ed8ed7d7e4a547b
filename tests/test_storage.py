import os
import threading
from datetime import timedelta

import fsspec
import pytest

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from vqpipe.output import storage


class Boom(Exception):
    pass


def fails_midway(f):
    f.write(b"partial")
    raise Boom


@pytest.fixture(params=["local", "memory"])
def target(request, tmp_path):
    """(fs, folder) on a local folder and on a fresh memory:// folder."""
    if request.param == "local":
        return storage.filesystem(str(tmp_path / "out"), {})
    return storage.filesystem(f"memory://storage-{tmp_path.name}", {})


def test_write_atomic_publishes_complete_content(target):
    fs, root = target
    _write_atomic(fs, f"{root}/a.bin", lambda f: f.write(b"hello"))
    assert fs.cat_file(f"{root}/a.bin") == b"hello"
    assert fs.ls(root, detail=False) == [f"{root}/a.bin"]  # no temp file left behind


def test_write_atomic_body_error_leaves_nothing(target):
    fs, root = target
    fs.makedirs(root, exist_ok=True)
    with pytest.raises(Boom):
        _write_atomic(fs, f"{root}/a.bin", fails_midway)
    assert fs.ls(root, detail=False) == []


def test_write_atomic_body_error_keeps_previous_version(target):
    fs, root = target
    _write_atomic(fs, f"{root}/a.bin", lambda f: f.write(b"v1"))
    with pytest.raises(Boom):
        _write_atomic(fs, f"{root}/a.bin", fails_midway)
    assert fs.cat_file(f"{root}/a.bin") == b"v1"


def test_write_create_only_keeps_the_first(target):
    fs, root = target
    assert storage.write_create_only(fs, f"{root}/m.json", b"first")
    assert not storage.write_create_only(fs, f"{root}/m.json", b"second")
    assert fs.cat_file(f"{root}/m.json") == b"first"
    assert fs.ls(root, detail=False) == [f"{root}/m.json"]


def test_local_create_only_race_has_one_winner(tmp_path):
    fs, root = storage.filesystem(str(tmp_path), {})
    barrier = threading.Barrier(8)
    wins = []

    def attempt(i):
        barrier.wait()
        wins.append(storage.write_create_only(fs, f"{root}/m.json", f"writer {i}".encode()))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert os.listdir(tmp_path) == ["m.json"]


def test_sweep_is_a_no_op_off_s3(tmp_path):
    assert storage.sweep_incomplete_uploads(fsspec.filesystem("file"), str(tmp_path)) == 0


def s3fs_for(bucket):
    return storage.filesystem(bucket.url, bucket.storage_options)[0]


def uploads(bucket):
    return bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])


def test_s3_write_atomic(s3_bucket):  # noqa: F811
    # 5 MiB blocks (the S3 minimum part) so 6 MiB of body really starts a multipart upload.
    options = {**s3_bucket.storage_options, "default_block_size": 5 * 2**20}
    fs = storage.filesystem(s3_bucket.url, options)[0]
    path = f"{s3_bucket.name}/out/a.bin"

    def six_mib_then_fail(f):
        f.write(b"x" * 6 * 2**20)
        assert uploads(s3_bucket), "a part should be in flight before the failure"
        raise Boom

    with pytest.raises(Boom):
        _write_atomic(fs, path, six_mib_then_fail)
    storage.invalidate(fs, path)
    assert not fs.exists(path)
    assert uploads(s3_bucket) == []  # the multipart upload was aborted, not leaked
    _write_atomic(fs, path, lambda f: f.write(b"x" * 100))
    assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="out/a.bin")["Body"].read() == b"x" * 100


def test_s3_create_only_is_conditional(s3_bucket):  # noqa: F811
    fs = s3fs_for(s3_bucket)
    path = f"{s3_bucket.name}/m.json"
    assert storage.write_create_only(fs, path, b"first")
    assert not storage.write_create_only(fs, path, b"second")
    assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="m.json")["Body"].read() == b"first"


def test_s3_sweep_aborts_stale_uploads_under_prefix(s3_bucket):  # noqa: F811
    client, name = s3_bucket.client, s3_bucket.name
    client.create_multipart_upload(Bucket=name, Key="out/x.parquet")
    client.create_multipart_upload(Bucket=name, Key="other/y.parquet")
    fs = s3fs_for(s3_bucket)
    assert storage.sweep_incomplete_uploads(fs, f"{name}/out/", older_than=timedelta(0)) == 1
    assert [u["Key"] for u in uploads(s3_bucket)] == ["other/y.parquet"]


def test_sweep_stale_temp_files_spares_live_writers(tmp_path):
    import os
    import time
    from datetime import timedelta

    from vqpipe.output.storage import sweep_stale_temp_files

    stale, live, data = tmp_path / ".a.parquet.1.tmp", tmp_path / ".b.parquet.2.tmp", tmp_path / "a.parquet"
    for path in (stale, live, data):
        path.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(data, (two_hours_ago, two_hours_ago))
    fs = fsspec.filesystem("file")
    assert sweep_stale_temp_files(fs, str(tmp_path), older_than=timedelta(hours=1)) == 1
    assert not stale.exists() and live.exists() and data.exists()


def _write_atomic(fs, path: str, write_fn) -> None:
    """How the sink uses open_atomic: write, then commit; discard if writing raises."""
    atomic = storage.open_atomic(fs, path)
    try:
        write_fn(atomic.file)
    except BaseException:
        atomic.discard()
        raise
    atomic.commit()
