"""Config: typed, validated once, every error names the key."""

import textwrap

import pytest

from vqpipe.config import ConfigError, load_config, redact_secrets

BASE = """
input:
  urls: data/{000..002}.tar
  storage_options: {key: AKIA123, secret: s3cr3t, client_kwargs: {endpoint_url: http://127.0.0.1:9000}}
model:
  path: demo
output:
  path: out/x
"""


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_and_types(tmp_path):
    config = load_config(_write(tmp_path, BASE))
    assert config.input.urls == ("data/{000..002}.tar",)
    assert config.input.image_keys == ("jpg", "jpeg", "png", "webp")
    assert config.preprocess.resolution == 256 and config.preprocess.value_range == (-1.0, 1.0)
    assert config.model.batch_size == 64 and config.model.precision == "auto" and config.model.compile == "auto"
    assert config.model.micro_batch == "auto"
    assert config.output.latent_dtype == "float16" and config.output.compression == "zstd"
    assert config.ray.address is None and config.ray.max_retries == 3


def test_dotted_overrides(tmp_path):
    config = load_config(_write(tmp_path, BASE), ["model.batch_size=128", "output.path=s3://b/x",
                                                  "ray.num_workers=4", "model.compile=false",
                                                  "preprocess.value_range=[0, 1]", "model.micro_batch=4"])
    assert config.model.batch_size == 128 and config.output.path == "s3://b/x"
    assert config.ray.num_workers == 4 and config.model.compile is False
    assert config.preprocess.value_range == (0.0, 1.0) and config.model.micro_batch == 4


@pytest.mark.parametrize("override, words", [
    ("output.colour=red", "unknown key 'output.colour'"),
    ("model.batch_size=big", "model.batch_size must be int"),
    ("model.precision=fp8", "model.precision = 'fp8'; choose one of"),
    ("model.batch_size=0", "model.batch_size must be >= 1"),
    ("model.micro_batch=0", "model.micro_batch must be >= 1 or auto"),
    ("preprocess.max_pixels=0", "preprocess.max_pixels must be >= 1 or unset"),
    ("preprocess.value_range=[1, 0]", "preprocess.value_range"),
    ("ray.num_workers=many", "ray.num_workers"),
    ("input.image_keys=[]", "input.image_keys must not be empty"),
    ("modelbatch_size", "section.key=value"),
])
def test_errors_name_the_key(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(")):
        load_config(_write(tmp_path, BASE), [override])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'output.path'"):
        load_config(_write(tmp_path, "input: {urls: a.tar}\nmodel: {path: demo}\noutput: {}\n"))


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "input: [unclosed\n"))


def test_secrets_are_redacted(tmp_path):
    config = load_config(_write(tmp_path, BASE))
    shown = config.to_dict()
    options = shown["input"]["storage_options"]
    assert options["key"] == "***" and options["secret"] == "***"
    assert options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert "s3cr3t" not in repr(shown) and "AKIA123" not in repr(shown)
    assert redact_secrets({"token": "abc", "nested": [{"password": "p"}]}) == {"token": "***",
                                                                                "nested": [{"password": "***"}]}
