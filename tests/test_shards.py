import io
import tarfile

import fsspec
import pytest

import shardfactory as sf
from vqpipe.records import Failure, ShardError
from vqpipe.input.shards import iter_samples, split_member_name


def read(url, **kwargs):
    """(samples, failures) of a whole shard."""
    failures: list[Failure] = []
    samples = list(iter_samples(url, {}, failures.append, **kwargs))
    return samples, failures


def read_until_error(url):
    """(keys yielded before the error, the ShardError)."""
    keys = []
    with pytest.raises(ShardError) as err:
        for sample in iter_samples(url, {}, lambda f: None):
            keys.append(sample.key)
    return keys, err.value


@pytest.fixture(scope="module")
def hostile_shard(tmp_path_factory):
    return str(sf.write_tar(tmp_path_factory.mktemp("shards") / "hostile.tar", sf.hostile_members()))


SHARD_STAGE = {"bad_member_name", "duplicate_key"}


def test_hostile_shard_member_outcomes(hostile_shard):
    samples, failures = read(hostile_shard)
    expected_failures = sorted((c.key, c.expected) for c in sf.hostile_cases() if c.expected in SHARD_STAGE)
    assert sorted((f.key, f.reason) for f in failures) == expected_failures
    not_read_here = SHARD_STAGE | {"skipped"}
    assert [s.key for s in samples] == [c.key for c in sf.hostile_cases() if c.expected not in not_read_here]
    assert all(s.source == hostile_shard for s in samples)


def test_first_sample_and_first_field_win(hostile_shard):
    samples = {s.key: s for s in read(hostile_shard)[0]}
    good_jpeg = dict(sf.hostile_members())["between.jpg"]
    assert samples["dup"].fields["jpg"] == good_jpeg
    assert samples["repeat"].fields["jpg"] == good_jpeg
    assert set(samples["UPPER"].fields) == {"jpg"}
    assert set(samples["good"].fields) == {"jpg", "txt", "json"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000008.jpg", ("000008", "jpg")),
        ("a/b/000008.v2.JPG", ("a/b/000008", "v2.jpg")),
        ("./x/k.txt", ("x/k", "txt")),
    ],
)
def test_key_is_path_up_to_first_dot_of_base_name(name, expected):
    assert split_member_name(name) == expected


@pytest.mark.parametrize(
    "name", ["../e.jpg", "a/../../e.jpg", "/etc/e.jpg", "noext", "a/noext", ".jpg", "a/.hidden.jpg", "k."]
)
def test_unsafe_or_extensionless_names_are_rejected(name):
    assert isinstance(split_member_name(name), str)


def test_gzipped_shard_reads_like_plain(tmp_path):
    members = sf.good_members("a") + sf.good_members("b")
    samples, failures = read(str(sf.write_tar(tmp_path / "s.tar.gz", members, gzip=True)))
    assert [s.key for s in samples] == ["a", "b"] and not failures


def test_empty_tar_yields_nothing_without_error(tmp_path):
    assert read(str(sf.write_tar(tmp_path / "empty.tar", []))) == ([], [])


def test_oversized_member_drops_its_sample(tmp_path):
    members = sf.good_members("big") + [("small.txt", b"x"), ("small.jpg", b"y")]
    samples, failures = read(str(sf.write_tar(tmp_path / "s.tar", members)), max_member_bytes=1000)
    assert [s.key for s in samples] == ["small"]
    assert [(f.key, f.reason) for f in failures] == [("big", "too_large")]


@pytest.fixture
def three_samples():
    return sf.tar_bytes(sf.good_members("a") + sf.good_members("b") + sf.good_members("c"))


def _member_starts(data):
    """Member name -> offset of its header in the tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def test_truncation_mid_member_raises_after_complete_samples(tmp_path, three_samples):
    starts = _member_starts(three_samples)
    cut = starts["c.jpg"] + 2000  # inside c's image data
    (tmp_path / "cut.tar").write_bytes(three_samples[:cut])
    keys, err = read_until_error(str(tmp_path / "cut.tar"))
    assert keys == ["a", "b"]
    assert err.reason == "truncated_tar"


def test_truncation_at_member_boundary_is_not_a_complete_shard(tmp_path, three_samples):
    # tarfile alone ends such a stream silently; the shard would look complete, and the
    # last sample would miss its caption and metadata.
    starts = _member_starts(three_samples)
    (tmp_path / "cut.tar").write_bytes(three_samples[: starts["c.txt"]])
    keys, err = read_until_error(str(tmp_path / "cut.tar"))
    assert keys == ["a", "b"]
    assert err.reason == "truncated_tar"


def test_truncated_gzip_stream(tmp_path):
    members = [m for i in range(6) for m in sf.good_members(f"k{i}", name="astronaut")]
    data = sf.tar_bytes(members, gzip=True)
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    keys, err = read_until_error(str(tmp_path / "cut.tar.gz"))
    assert err.reason == "truncated_tar" and 0 < len(keys) < 6


@pytest.mark.parametrize("data", [b"", b"not a tar file " * 100], ids=["zero_bytes", "text"])
def test_not_a_tar_is_corrupt(tmp_path, data):
    (tmp_path / "bad.tar").write_bytes(data)
    keys, err = read_until_error(str(tmp_path / "bad.tar"))
    assert keys == [] and err.reason == "corrupt_tar"


def test_corrupt_header_after_first_member(tmp_path, three_samples):
    data = bytearray(three_samples)
    data[_member_starts(three_samples)["c.jpg"] + 100] ^= 0xFF  # breaks the checksum
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    keys, err = read_until_error(str(tmp_path / "bad.tar"))
    # b was still open when the stream broke: it might miss fields, so it is withheld.
    assert err.reason == "corrupt_tar" and keys == ["a"]


def test_missing_shard_local_and_memory(tmp_path):
    assert read_until_error(str(tmp_path / "nope.tar"))[1].reason == "missing_shard"
    assert read_until_error("memory://no/such.tar")[1].reason == "missing_shard"


def test_other_os_errors_are_read_errors(tmp_path):
    assert read_until_error(str(tmp_path))[1].reason == "read_error"  # a folder, not a file


def test_reads_from_memory_filesystem():
    fsspec.filesystem("memory").pipe_file("/shards/m.tar", sf.tar_bytes(sf.good_members("m")))
    samples, failures = read("memory://shards/m.tar")
    assert [s.key for s in samples] == ["m"] and not failures
