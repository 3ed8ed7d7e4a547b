"""The output's fingerprint: settings that change which samples or what values a row holds make a
rerun into the same folder refuse (unless --overwrite); an old manifest without a newer key does not."""

import yaml

from vqpipe.run import manifest as plan
from vqpipe.config import load_config

METADATA = {"weights_sha256": "abc", "scaling_factor": 1.0, "codes_shape": [16, 16], "latent_shape": [4, 16, 16],
            "latent_dtype": "float16", "resolution": 64, "value_range": [-1.0, 1.0], "image_keys": ["jpg"]}


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
