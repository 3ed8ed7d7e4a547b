import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from vqpipe.input.urls import NoMatchError, expand_urls, shard_stems


def test_brace_range_keeps_zero_padding():
    assert expand_urls("s3://b/{00008..00011}.tar", {}) == [f"s3://b/{i:05d}.tar" for i in range(8, 12)]


def test_alternatives_and_several_braces_expand_in_order():
    got = expand_urls("gs://{a,b}/part-{0..1}.tar", {})
    assert got == ["gs://a/part-0.tar", "gs://a/part-1.tar", "gs://b/part-0.tar", "gs://b/part-1.tar"]


def test_list_input_is_deduplicated_keeping_first_position():
    got = expand_urls(["x/{0..2}.tar", "x/1.tar", "x/{2,3}.tar"], {})
    assert got == ["x/0.tar", "x/1.tar", "x/2.tar", "x/3.tar"]


def test_unbalanced_brace_is_a_value_error():
    with pytest.raises(ValueError):
        expand_urls("x/{0..2.tar", {})


def test_local_glob_lists_files_sorted_and_skips_folders(tmp_path):
    for name in ["b.tar", "a.tar", "c.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.tar").mkdir()
    assert expand_urls(str(tmp_path / "*.tar"), {}) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def test_glob_keeps_protocol_prefix():
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe_file(f"/globtest/{i}.tar", b"")
    # memory:// paths are rooted at "/", so fsspec lists them as /globtest/...
    got = expand_urls("memory://globtest/[01].tar", {})
    assert got == ["memory:///globtest/0.tar", "memory:///globtest/1.tar"]


def test_s3_glob_keeps_scheme_and_bucket(s3_bucket):  # noqa: F811
    for key in ["shards/000.tar", "shards/001.tar", "shards/notes.txt"]:
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"")
    got = expand_urls(f"{s3_bucket.url}/shards/*.tar", s3_bucket.storage_options)
    assert got == [f"{s3_bucket.url}/shards/000.tar", f"{s3_bucket.url}/shards/001.tar"]


def test_glob_inside_brace_expansion(tmp_path):
    for d in ["x", "y"]:
        (tmp_path / d).mkdir()
        (tmp_path / d / "0.tar").write_bytes(b"")
    got = expand_urls(f"{tmp_path}/{{y,x}}/*.tar", {})
    assert got == [f"{tmp_path}/y/0.tar", f"{tmp_path}/x/0.tar"]


def test_pattern_matching_nothing_raises_naming_it(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(NoMatchError) as err:
        expand_urls([str(tmp_path / "*.tar"), str(tmp_path / "nope-*.tar")], {})
    assert err.value.patterns == [str(tmp_path / "nope-*.tar")]


def test_stems_strip_tar_suffixes():
    urls = ["s3://b/d/00001.tar", "s3://b/d/00002.tar.gz", "/data/x.tgz"]
    assert shard_stems(urls) == {urls[0]: "00001", urls[1]: "00002", urls[2]: "x"}


def test_colliding_stems_get_just_enough_parents():
    urls = ["s3://b/laion/a/part/000.tar", "s3://b/laion/b/part/000.tar", "s3://b/laion/a/part/001.tar"]
    assert shard_stems(urls) == {urls[0]: "a__part__000", urls[1]: "b__part__000", urls[2]: "001"}


def test_urls_differing_only_by_scheme_get_hash_suffixes():
    stems = shard_stems(["s3://b/x.tar", "gs://b/x.tar"])
    assert len(set(stems.values())) == 2
    assert all(s.startswith("b__x-") for s in stems.values())


def test_stems_are_safe_file_names():
    stems = shard_stems(["s3://b/_hidden.tar", "s3://b/.dot.tar", "/p/we:ird name?.tar"])
    assert stems["s3://b/_hidden.tar"] == "hidden"
    assert stems["s3://b/.dot.tar"] == "dot"
    assert stems["/p/we:ird name?.tar"] == "we_ird_name_"


paths = st.lists(
    st.lists(st.sampled_from(["a", "b", "_c", "d.e", "x y"]), min_size=1, max_size=4).map(
        lambda parts: "s3://bkt/" + "/".join(parts) + ".tar"
    ),
    max_size=12,
)


@given(paths)
def test_stems_are_unique_safe_and_reproducible(urls):
    stems = shard_stems(urls)
    assert set(stems) == set(urls)
    assert len(set(stems.values())) == len(stems)
    for stem in stems.values():
        assert "/" not in stem and stem[0] not in "._"
    assert shard_stems(list(urls)) == stems
