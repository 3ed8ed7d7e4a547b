"""input.filters, input.filter_missing, preprocess.max_aspect_ratio: samples left out before any image
decode, counted by rule apart from failures, in markers, the run summary and `vqpipe inspect`."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import simplejpeg
import torch
import yaml
from PIL import ImageFile

import shardfactory as sf
from vqpipe import cli
from vqpipe.config import ConfigError, FilterRule, InputConfig, ModelConfig, OutputConfig, PreprocessConfig, load_config
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.input.filters import SampleFilter
from vqpipe.model.loading import load_model
from vqpipe.output.sink import read_marker
from vqpipe.read.inspect import format_text, inspect_output
from vqpipe.records import Sample
from vqpipe.run import manifest
from vqpipe.run import shard_job
from vqpipe.run.shard_job import make_settings, process_shard
from runfiles import write_config

# LAION-style rules, as open-muse filters its shards.
RULES = {"pwatermark": {"max": 0.8}, "punsafe": {"max": 0.5}, "aesthetic": {"min": 5.0}, "width": {"min": 64}}

# key -> (json metadata or None for no json member, image size, outcome: kept / the rule that drops it)
CASES = {
    "a-ok": ({"pwatermark": 0.1, "punsafe": 0.0, "aesthetic": 6.0, "width": 512}, (96, 64), "kept"),
    "b-ok": ({"pwatermark": 0.8, "punsafe": 0.5, "aesthetic": 5.0, "width": 64}, (64, 64), "kept"),
    "c-watermark": ({"pwatermark": 0.95, "punsafe": 0.0, "aesthetic": 6.0, "width": 512}, (64, 64), "pwatermark"),
    "d-unsafe": ({"pwatermark": 0.1, "punsafe": 0.9, "aesthetic": 6.0, "width": 512}, (64, 64), "punsafe"),
    "e-ugly": ({"pwatermark": 0.1, "punsafe": 0.1, "aesthetic": 4.2, "width": 512}, (64, 64), "aesthetic"),
    "f-ugly": ({"pwatermark": 0.1, "punsafe": 0.1, "aesthetic": 3.0, "width": 512}, (64, 64), "aesthetic"),
    "g-narrow": ({"pwatermark": 0.1, "punsafe": 0.1, "aesthetic": 6.0, "width": 32}, (64, 64), "width"),
    "h-no-aesthetic": ({"pwatermark": 0.1, "punsafe": 0.1, "width": 512}, (64, 64), "missing:aesthetic"),
    "i-null-punsafe": ({"pwatermark": 0.1, "punsafe": None, "aesthetic": 6.0, "width": 512}, (64, 64),
                       "missing:punsafe"),
    "j-no-json": (None, (64, 64), "missing:*"),  # fails the first rule in the config's order
    "k-banner": ({"pwatermark": 0.1, "punsafe": 0.1, "aesthetic": 6.0, "width": 512}, (256, 64), "max_aspect_ratio"),
}


def _members():
    members = []
    for key, (meta, size, _) in CASES.items():
        members.append((f"{key}.jpg", sf.jpeg_bytes(sf.photo("chelsea", size))))
        if meta is not None:
            members.append((f"{key}.json", json.dumps(meta).encode()))
    # passes every rule but is not an image: a failure, not a filtered sample
    members += [("z-broken.jpg", b"not a jpeg"), ("z-broken.json", json.dumps(CASES["a-ok"][0]).encode())]
    return members


def _expected(missing: str, first_rule: str = "pwatermark") -> tuple[set[str], dict[str, int]]:
    kept, by_rule = set(), {}
    for key, (_, _, outcome) in CASES.items():
        rule = outcome.removeprefix("missing:").replace("*", first_rule)
        if outcome == "kept" or (outcome.startswith("missing:") and missing == "keep"):
            kept.add(key)
        else:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    return kept, by_rule


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _job(model_path, out, missing):
    model = load_model(ModelConfig(path=model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 4, (-1.0, 1.0))
    rules = {k: FilterRule(**v) for k, v in RULES.items()}
    job = make_settings(InputConfig(urls=("x",), filters=rules, filter_missing=missing),
                        PreprocessConfig(resolution=32, max_aspect_ratio=3.0), OutputConfig(path=str(out)), model,
                        "fp32")
    return encoder, job


class _DecodeCounter:
    """Counts real pixel decodes (Pillow's ``ImageFile.load``, and libjpeg-turbo's on the JPEG fast
    path) and calls of the preprocessing step, from any thread."""

    def __init__(self, monkeypatch):
        self.loads, self.preprocessed, self._lock = 0, [], threading.Lock()
        load, preprocess, decode_jpeg = ImageFile.ImageFile.load, shard_job.preprocess, simplejpeg.decode_jpeg

        def counted_decode_jpeg(*args, **kwargs):
            with self._lock:
                self.loads += 1
            return decode_jpeg(*args, **kwargs)

        def counted_load(img):
            if img.tile:  # pixels still to decode (load() on a loaded image is a no-op)
                with self._lock:
                    self.loads += 1
            return load(img)

        def counted_preprocess(sample, *args, **kwargs):
            with self._lock:
                self.preprocessed.append(sample.key)
            return preprocess(sample, *args, **kwargs)

        monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
        monkeypatch.setattr(simplejpeg, "decode_jpeg", counted_decode_jpeg)
        monkeypatch.setattr(shard_job, "preprocess", counted_preprocess)


@pytest.mark.parametrize("missing", ["keep", "drop"])
def test_counts_by_rule_and_no_decode_for_filtered_samples(tmp_path, tiny_model_path, pool, monkeypatch, missing):
    shard = sf.write_tar(tmp_path / "laion.tar", _members())
    encoder, job = _job(tiny_model_path, tmp_path / "out", missing)
    counter = _DecodeCounter(monkeypatch)
    result = process_shard(str(shard), "laion", job, encoder, pool)
    kept, by_rule = _expected(missing)
    marker = read_marker(str(tmp_path / "out"), "laion", {})
    assert result.filtered_by_rule == marker["filtered_by_rule"] == by_rule
    assert marker["filtered"] == sum(by_rule.values()) == len(marker["filtered_examples"])  # <= 5 per rule here
    assert {f["reason"] for f in marker["filtered_examples"]} == {"filtered"}
    assert any(f["rule"] == "aesthetic" and "4.2 is below min 5" in f["message"] for f in marker["filtered_examples"])
    # the broken image is the only failure, and filtered samples are not failures
    assert result.failures_by_reason == marker["failures_by_reason"] == {"decode_error": 1}
    assert result.rows == marker["rows"] == len(kept)
    # only samples that passed every filter reach the decoder: one decode each (the broken one fails in open)
    assert sorted(counter.preprocessed) == sorted(kept | {"z-broken"})
    assert counter.loads == len(kept)


def test_rules_on_values():
    screen = SampleFilter({"status": FilterRule(allowed=("success", 1)), "aesthetic": FilterRule(min=5.0)})

    def outcome(meta):
        found = screen(Sample("k", {"json": json.dumps(meta).encode()}, "x"))
        return found and found.rule

    assert outcome({"status": "success", "aesthetic": 5.5}) is None
    assert outcome({"status": 1, "aesthetic": 5.5}) is None
    assert outcome({"status": True, "aesthetic": 5.5}) == "status"  # JSON true is not 1
    assert outcome({"status": "failed_to_download", "aesthetic": 9}) == "status"
    assert outcome({"status": "success", "aesthetic": "high"}) == "aesthetic"
    assert outcome({"status": "success", "aesthetic": float("nan")}) == "aesthetic"
    assert outcome({"status": "success"}) is None  # filter_missing defaults to keep


def _config(tmp_path, filters, *overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"input": {"urls": "x.tar", "filters": filters}, "model": {"path": "demo"},
                                    "output": {"path": str(tmp_path / "out")}}))
    return load_config(path, list(overrides))


@pytest.mark.parametrize("filters, message", [
    ({"aesthetic": {"minimum": 5}}, "unknown key 'input.filters.aesthetic.minimum'"),
    ({"aesthetic": {"min": "high"}}, "input.filters.aesthetic.min must be float"),
    ({"aesthetic": {}}, "input.filters.aesthetic sets no bound"),
    ({"aesthetic": {"min": 6, "max": 5}}, "input.filters.aesthetic: min 6.0 > max 5.0"),
    ({"status": {"in": []}}, "input.filters.status.in must list at least one value"),
    ({"aesthetic": 5}, "input.filters.aesthetic: expected a mapping"),
])
def test_bad_filters_name_the_key(tmp_path, filters, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _config(tmp_path, filters)


def test_bad_aspect_ratio_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="preprocess.max_aspect_ratio"):
        _config(tmp_path, {}, "preprocess.max_aspect_ratio=0.5")


def test_filters_are_part_of_the_fingerprint(tmp_path):
    metadata = {"weights_sha256": "abc", "model_config": {"norm_num_groups": 8}, "scaling_factor": 1.0, "codes_shape": [4, 4], "latent_shape": [4, 4, 4],
                "latent_dtype": "float16", "resolution": 32, "value_range": [-1.0, 1.0], "image_keys": ["jpg"]}
    before = {"fingerprint": manifest.fingerprint(metadata, _config(tmp_path, RULES))}
    assert manifest.incompatibilities(before, manifest.fingerprint(metadata, _config(tmp_path, RULES))) == []
    changes = [_config(tmp_path, {**RULES, "aesthetic": {"min": 6.0}}), _config(tmp_path, {}),
               _config(tmp_path, RULES, "input.filter_missing=drop"),
               _config(tmp_path, RULES, "preprocess.max_aspect_ratio=2")]
    for config in changes:
        assert manifest.incompatibilities(before, manifest.fingerprint(metadata, config)) != []
    old = manifest.fingerprint(metadata, _config(tmp_path, {}))
    for key in ("filters", "filter_missing", "max_aspect_ratio", "views", "crop_range"):
        del old[key]  # an output written before these keys existed still resumes with the defaults
    assert manifest.incompatibilities({"fingerprint": old}, manifest.fingerprint(metadata, _config(tmp_path, {}))) == []


@pytest.mark.usefixtures("ray_cluster")
def test_a_mostly_filtered_run_never_trips_the_guard(tmp_path, tiny_model_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for s in range(2):
        sf.write_tar(folder / f"laion-{s:05d}.tar", [(f"{s}{name}", data) for name, data in _members()])
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(folder / "laion-*.tar"), out,
                          input={"filters": RULES, "filter_missing": "drop"}, preprocess={"max_aspect_ratio": 3.0},
                          ray={"guard_shards": 2, "guard_fail_fraction": 0.5, "num_workers": 1})
    assert cli.main(["run", str(config)]) == 0
    kept, by_rule = _expected("drop", first_rule="aesthetic")  # yaml.safe_dump sorts the rules
    twice = {rule: 2 * n for rule, n in by_rule.items()}
    summary = capsys.readouterr().out
    assert re.search(rf"samples filtered\s+{sum(twice.values())}\n", summary)
    totals = json.loads((out / "_vqpipe" / "run.json").read_text())["totals"]
    assert totals["samples_filtered_by_rule"] == twice
    assert totals["samples_failed_by_reason"] == {"decode_error": 2}
    assert totals["samples_written"] == 2 * len(kept)
    stats = inspect_output(str(out))
    assert stats.shards.filtered_samples_by_rule == twice
    assert stats.shards.failed_samples_by_reason == {"decode_error": 2}
    assert f"filtered samples: {sum(twice.values())} (" in format_text(stats)


def test_marker_names_a_few_filtered_samples_per_rule_and_counts_all(tmp_path, tiny_model_path, pool):
    ugly = json.dumps({**CASES["a-ok"][0], "aesthetic": 1.0}).encode()
    jpeg = sf.jpeg_bytes(sf.photo("chelsea", (64, 64)))
    members = [m for i in range(12) for m in ((f"{i:03d}.jpg", jpeg), (f"{i:03d}.json", ugly))]
    shard = sf.write_tar(tmp_path / "ugly.tar", members)
    encoder, job = _job(tiny_model_path, tmp_path / "out", "keep")
    process_shard(str(shard), "ugly", job, encoder, pool)
    marker = read_marker(str(tmp_path / "out"), "ugly", {})
    assert marker["filtered"] == 12 and marker["filtered_by_rule"] == {"aesthetic": 12}
    assert [f["key"] for f in marker["filtered_examples"]] == [f"{i:03d}" for i in range(shard_job.FILTERED_EXAMPLES)]


def test_progress_and_summary_count_filtered_apart_from_bad_samples(caplog):
    import io
    import logging

    from vqpipe.run.outcome import Outcome
    from vqpipe.run.progress import Progress, summary_table
    from vqpipe.run.shard_job import ShardResult, StageTimes

    result = ShardResult("u", "s", True, rows=3, failures=[], times=StageTimes(),
                         failures_by_reason={"decode_error": 1}, filtered_by_rule={"aesthetic": 4, "punsafe": 2})
    outcome = Outcome(committed={"s": result})
    with caplog.at_level(logging.INFO, logger="vqpipe.run.progress"):
        Progress(total=1, already=0, stream=io.StringIO()).update(outcome, force=True)
    assert "| 1 bad samples | 6 filtered" in caplog.text
    table = summary_table(outcome, skipped=0, wall_s=1.0, output="out")
    assert re.search(r"samples failed\s+1\n\s+decode_error\s+1\n", table)
    assert re.search(r"samples filtered\s+6\n\s+aesthetic\s+4\n\s+punsafe\s+2\n", table)
