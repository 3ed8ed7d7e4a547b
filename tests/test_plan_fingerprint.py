"""The output's fingerprint: settings that change which samples or what values a row holds make a
rerun into the same folder refuse (unless --overwrite); an old manifest without a newer key does not."""

import yaml

from vqpipe.run import manifest as plan
from vqpipe.config import load_config

METADATA = {"weights_sha256": "abc", "scaling_factor": 1.0, "codes_shape": [16, 16], "latent_shape": [4, 16, 16],
            "latent_dtype": "float16", "resolution": 64, "value_range": [-1.0, 1.0], "image_keys": ["jpg"],
            "model_config": {"norm_num_groups": 8, "embed_dim": 4}}


def _config(tmp_path, *overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"input": {"urls": "x.tar"}, "model": {"path": "demo"},
                                    "output": {"path": str(tmp_path / "out")}}))
    return load_config(path, list(overrides))


def test_max_pixels_is_part_of_the_fingerprint(tmp_path):
    before = {"fingerprint": plan.fingerprint(METADATA, _config(tmp_path))}
    same = plan.fingerprint(METADATA, _config(tmp_path))
    capped = plan.fingerprint(METADATA, _config(tmp_path, "preprocess.max_pixels=50000000"))
    assert plan.incompatibilities(before, same) == []
    assert plan.incompatibilities(before, capped) == ["max_pixels: output has None, this run 50000000"]


def test_a_manifest_from_before_max_pixels_still_matches(tmp_path):
    old = plan.fingerprint(METADATA, _config(tmp_path))
    del old["max_pixels"]
    assert plan.incompatibilities({"fingerprint": old}, plan.fingerprint(METADATA, _config(tmp_path))) == []


def test_the_model_config_is_part_of_the_fingerprint(tmp_path):
    """Same weights, another architecture setting: the rows mean something else."""
    before = {"fingerprint": plan.fingerprint(METADATA, _config(tmp_path))}
    other = {**METADATA, "model_config": {**METADATA["model_config"], "norm_num_groups": 4}}
    assert plan.incompatibilities(before, plan.fingerprint(other, _config(tmp_path))) == [
        "model_config.norm_num_groups: output has 8, this run 4"]


def _committed_output(tmp_path, metadata: dict) -> str:
    from vqpipe.output.sink import ShardWriter, TokenLayout

    out = str(tmp_path / "out")
    writer = ShardWriter(out, "s", TokenLayout((16, 16), (4, 16, 16), 1024), metadata, {})
    writer.commit({"source": "x.tar"})
    return out


def _recorded(config):
    from vqpipe.output import storage
    from vqpipe.output.markers import audit

    return plan.recorded(config, audit(*storage.filesystem(config.output.path, {})))


def test_without_run_json_the_data_files_own_metadata_is_the_fingerprint(tmp_path):
    _committed_output(tmp_path, METADATA)  # no run.json: as if deleted
    config = _config(tmp_path)
    other_weights = plan.fingerprint({**METADATA, "weights_sha256": "def"}, config)
    assert plan.incompatibilities(_recorded(config), other_weights) == [
        "weights_sha256: output has 'abc', this run 'def'"]
    assert plan.incompatibilities(_recorded(config), plan.fingerprint(METADATA, config)) == []


def test_a_corrupt_run_json_is_named_and_read_as_absent(tmp_path, caplog):
    out = _committed_output(tmp_path, METADATA)
    (tmp_path / "out" / "_vqpipe" / "run.json").write_text('{"fingerprint": {"weights_sha')
    config = _config(tmp_path)
    assert plan.read_manifest(config) is None
    assert f"{out}/_vqpipe/run.json is corrupt" in caplog.text
    assert plan.incompatibilities(_recorded(config), plan.fingerprint({**METADATA, "weights_sha256": "def"}, config))
