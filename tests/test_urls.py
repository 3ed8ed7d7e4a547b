import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from vqpipe.input.urls import NoMatchError, expand, expand_urls, glob_reaches, normalise_url, shard_stem, shard_stems


def test_brace_range_keeps_zero_padding():
    assert expand_urls("s3://b/{00008..00011}.tar", {}) == [f"s3://b/{i:05d}.tar" for i in range(8, 12)]


def test_alternatives_and_several_braces_expand_in_order():
    got = expand_urls("gs://{a,b}/part-{0..1}.tar", {})
    assert got == ["gs://a/part-0.tar", "gs://a/part-1.tar", "gs://b/part-0.tar", "gs://b/part-1.tar"]


def test_list_input_is_deduplicated_keeping_first_position(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = expand_urls(["x/{0..2}.tar", "x/1.tar", "x/{2,3}.tar"], {})
    assert got == [f"{tmp_path}/x/{i}.tar" for i in range(4)]  # local paths come back absolute


def test_one_file_spelled_five_ways_is_one_shard(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    monkeypatch.chdir(tmp_path)
    spellings = ["dir/f.tar", "dir/./f.tar", "dir//f.tar", f"file://{tmp_path}/dir/f.tar", f"{tmp_path}/dir/f.tar",
                 "./dir/../dir/f.tar"]
    assert expand_urls(spellings, {}) == [f"{tmp_path}/dir/f.tar"]
    assert len({shard_stem(u) for u in spellings}) == 1


def test_object_store_urls_keep_their_keys_and_lower_case_the_scheme():
    assert normalise_url("S3://b/a//x.tar") == "s3://b/a//x.tar"  # two keys on S3, not one


def test_a_pattern_naming_an_existing_file_is_that_file(tmp_path):
    for name in ["shard[1].tar", "shard1.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(str(tmp_path / "shard[1].tar"), {}) == [str(tmp_path / "shard[1].tar")]
    assert expand_urls(str(tmp_path / "shard[0-9].tar"), {}) == [str(tmp_path / "shard1.tar")]


def test_globs_keep_only_tar_files_and_count_the_rest(tmp_path):
    names = ["a.tar", "b.tar.gz", "c.tgz", "d.tar.bz2", "e.tar.xz", "F.TAR", "notes.txt", "a.parquet", "x.json"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    got = expand(str(tmp_path / "*"), {})
    assert [u.rsplit("/", 1)[1] for u in got.urls] == ["F.TAR", "a.tar", "b.tar.gz", "c.tgz", "d.tar.bz2", "e.tar.xz"]
    assert got.passed_over == 3
    with pytest.raises(NoMatchError):
        expand(str(tmp_path / "*.txt"), {})  # matched files, none a shard


def test_glob_reach():
    assert glob_reaches("/d/*", "/d")
    assert glob_reaches("/d/*.tar", "/d/")
    assert glob_reaches("/d/**", "/d/out")
    assert glob_reaches("/d/*/*.tar", "/d/out")
    assert not glob_reaches("/d/*", "/d/out")
    assert not glob_reaches("/d/*.tar", "/e")
    assert glob_reaches("s3://b/in/*", "s3://b/in")
    assert not glob_reaches("s3://b/in/*", "s3://b/out")


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


def test_stems_strip_tar_suffixes_and_add_a_hash_of_the_url():
    urls = ["s3://b/d/00001.tar", "s3://b/d/00002.tar.gz", "/data/x.tgz", "/data/y.tar.xz"]
    stems = shard_stems(urls)
    assert [s.rsplit("-", 1)[0] for s in stems.values()] == ["00001", "00002", "x", "y"]
    assert all(len(s.rsplit("-", 1)[1]) == 8 for s in stems.values())


def test_a_stem_depends_on_its_url_alone():
    """A growing list (the same file name in a new folder) must not rename a committed shard."""
    alone = shard_stems(["s3://b/a/x.tar"])
    grown = shard_stems(["s3://b/b/x.tar", "s3://b/a/x.tar", "s3://b/c/y.tar"])
    assert grown["s3://b/a/x.tar"] == alone["s3://b/a/x.tar"]
    assert len(set(grown.values())) == 3


def test_urls_differing_only_by_scheme_get_different_stems():
    stems = shard_stems(["s3://b/x.tar", "gs://b/x.tar"])
    assert len(set(stems.values())) == 2
    assert all(s.startswith("x-") for s in stems.values())


def test_stems_are_safe_file_names():
    stems = shard_stems(["s3://b/_hidden.tar", "s3://b/.dot.tar", "/p/we:ird name?.tar"])
    assert stems["s3://b/_hidden.tar"].startswith("hidden-")
    assert stems["s3://b/.dot.tar"].startswith("dot-")
    assert stems["/p/we:ird name?.tar"].startswith("we_ird_name_-")


paths = st.lists(
    st.lists(st.sampled_from(["a", "b", "_c", "d.e", "x y"]), min_size=1, max_size=4).map(
        lambda parts: "s3://bkt/" + "/".join(parts) + ".tar"
    ),
    max_size=12,
)


@given(paths, paths)
def test_stems_are_unique_safe_and_independent_of_the_rest_of_the_list(urls, others):
    stems = shard_stems(urls)
    assert set(stems) == set(urls)
    assert len(set(stems.values())) == len(stems)
    for stem in stems.values():
        assert "/" not in stem and stem[0] not in "._"
    together = shard_stems(others + urls)
    assert all(together[u] == stems[u] for u in urls)
