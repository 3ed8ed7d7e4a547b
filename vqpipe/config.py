"""Typed run configuration: YAML sections mirroring the stages, validated once at the edge.

Each field is documented where it is declared (its ``doc`` metadata is what ``--help-config``
prints). Inner code receives these frozen objects, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vqpipe.encode.fidelity import DEFAULT_MIN_CODE_AGREEMENT
from vqpipe.encode.precision import Precision

SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


class ConfigError(ValueError):
    """A config problem; the message names the key (``model.batch_size``) or the file."""


def _f(default: Any = dataclasses.MISSING, doc: str = "", yaml_key: str | None = None, **kw) -> Any:
    # yaml_key: the name in YAML when it cannot be a Python name (``in``).
    metadata = {"doc": doc, "yaml_key": yaml_key}
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _yaml_name(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml_key") or f.name


# Member extensions tried, in order, for a sample's image (img2dataset writes jpg).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# What preprocess.views may list (vqpipe/input/views.py builds them).
ViewKind = Literal["center", "hflip", "ten_crop"]


@dataclass(frozen=True)
class FilterRule:
    """One key of ``input.filters``: the sample's JSON value must pass every bound given."""

    min: Union[float, None] = _f(None, doc="keep values >= min")
    max: Union[float, None] = _f(None, doc="keep values <= max")
    allowed: Union[tuple[Union[str, int, float, bool], ...], None] = _f(
        None, doc="keep values in this list (strings, numbers, booleans)", yaml_key="in")

    def to_dict(self) -> dict:
        """The YAML form (``in``, not ``allowed``), bounds left unset omitted."""
        given = {"min": self.min, "max": self.max, "in": list(self.allowed) if self.allowed is not None else None}
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class InputConfig:
    urls: tuple[str, ...] = _f(doc="shard URL(s): a string or list, brace- ({00000..00099}) and glob-expanded")
    storage_options: dict = _f({}, doc="fsspec options for reading shards (endpoint_url, key, secret, ...)")
    image_keys: tuple[str, ...] = _f(IMAGE_KEYS,
                                     doc="member extensions that hold the image, in priority order")
    filters: dict[str, FilterRule] = _f(
        {}, doc="keep only samples whose json metadata passes, before any image decode, e.g. "
                "{aesthetic: {min: 5.0}, punsafe: {max: 0.5}, status: {in: [success]}}; others count as filtered")
    filter_missing: Literal["keep", "drop"] = _f(
        "keep", doc="a sample whose json lacks a filtered key (or has null there, or no json): keep or drop it")


@dataclass(frozen=True)
class PreprocessConfig:
    resolution: int = _f(256, doc="square side fed to the model (shorter side resized, then center-cropped)")
    min_size: int = _f(0, doc="skip images whose shorter side is smaller (reason too_small)")
    max_pixels: Union[int, None] = _f(
        None, doc="skip images with more pixels, read from the header before decoding (reason too_large); "
                  "unset = Pillow's bomb limit only (~89 MP)")
    max_aspect_ratio: Union[float, None] = _f(
        None, doc="skip images whose longer side is more than this many times the shorter, read from the "
                  "header before decoding (counted as filtered); unset = no limit")
    views: tuple[ViewKind, ...] = _f(
        ("center",), doc="views encoded per image, in order, from one decode: center (the square crop), hflip "
                         "(its mirror image), ten_crop (LlamaGen's four corners + center of the image resized to "
                         "crop_range * resolution, then mirrored: 10 views)")
    crop_range: float = _f(1.1, doc="ten_crop: the shorter side is resized to crop_range * resolution "
                                    "(LlamaGen uses 1.1, or 1.05)")
    value_range: tuple[float, float] = _f((-1.0, 1.0), doc="pixel range the model expects: [-1, 1] or [0, 1]")
    fast_jpeg: bool = _f(
        True, doc="RGB/grayscale JPEGs through libjpeg-turbo + a SIMD resize (vqpipe/input/jpeg_decode.py): 1.5-2x the "
                  "per-core rate, pixels within rounding of the Pillow path (false = Pillow only, bit-exact with "
                  "outputs written before it)")
    decoder: Literal["cpu", "gpu"] = _f(
        "cpu", doc="gpu = JPEGs the fast path takes are decoded a batch at a time on the worker's device (nvJPEG "
                   "through torchvision's decode_jpeg; needs torchvision on a CUDA worker, a CPU worker runs a "
                   "stand-in decode), resized and center-cropped there to the CPU path's geometry; other images, "
                   "and any the device fails to decode, take the CPU path (vqpipe/input/device_decode.py). "
                   "Plain [center] views only")
    decode_workers: Union[int, Literal["auto"]] = _f(
        "auto", doc="image-decoding threads per worker; auto = the worker's CPUs (ray.cpus_per_worker)")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f(doc="diffusers-format checkpoint folder, local or fsspec URL; 'demo' = the shipped demo tokenizer")
    subfolder: Union[str, None] = _f(None, doc="subfolder inside path (e.g. 'vqvae' or 'movq')")
    storage_options: dict = _f({}, doc="fsspec options for reading the checkpoint")
    scaling_factor: Union[float, None] = _f(None, doc="override the checkpoint's scaling_factor")
    precision: Precision = _f(
        "auto", doc="auto = fp16 on CUDA (bf16 when the checkpoint sets force_upcast), fp32 on CPU; "
                    "tf32 = fp32 tensors with TF32 matmuls and convolutions (CUDA)")
    compile: Literal["auto", True, False] = _f("auto", doc="torch.compile the encoder; auto = on for CUDA")
    batch_size: int = _f(64, doc="images per encoder call (on a GPU also per forward pass; see micro_batch)")
    micro_batch: Union[int, Literal["auto"]] = _f(
        "auto", doc="images per forward pass within a batch; auto = the batch on GPU, cache-sized on CPU")
    audit_samples: int = _f(
        4, doc="fidelity audit: images per shard re-encoded in fp32 and decoded, recorded in the shard's "
               "marker (0 = off; nothing to audit when precision is fp32)")
    min_code_agreement: float = _f(
        DEFAULT_MIN_CODE_AGREEMENT, doc="the guard stops the run when the first shards' audited codes agree with fp32 less than "
                  "this; later shards below it are listed in the summary (0 = off)")
    fallback_after: int = _f(
        3, doc="AMP batches non-finite this many times in a row switch the worker to the next safer "
               "precision (fp16 -> bf16 -> fp32) for the rest of its life (0 = never)")


@dataclass(frozen=True)
class OutputConfig:
    path: str = _f(doc="output folder, local or fsspec URL")
    storage_options: dict = _f({}, doc="fsspec options for writing")
    codes: bool = _f(True, doc="write the codes column")
    latents: bool = _f(True, doc="write the latents column (h * scaling_factor)")
    latent_dtype: Literal["float16", "float32"] = _f("float16", doc="storage dtype of latents")
    compression: Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"] = _f("zstd", doc="Parquet codec")


@dataclass(frozen=True)
class RayConfig:
    address: Union[str, None] = _f(None, doc="unset = embedded local Ray; 'auto' or 'ray://host:port' = join a cluster")
    num_workers: Union[int, Literal["auto"]] = _f("auto", doc="auto = one per GPU, or one CPU worker without GPUs")
    gpus_per_worker: Union[float, Literal["auto"]] = _f("auto", doc="auto = 1 when the cluster has GPUs, else 0")
    cpus_per_worker: int = _f(2, doc="CPUs reserved per worker for image decoding")
    max_retries: int = _f(3, doc="attempts per shard before it is recorded as failed")
    shard_timeout_s: float = _f(900.0, doc="a shard whose worker shows no progress this long is handed to another")
    speculative: bool = _f(True, doc="near the end, idle workers re-run the slowest shards (first commit wins)")
    guard_shards: int = _f(4, doc="misconfiguration guard: look at the first N finished shards")
    guard_fail_fraction: float = _f(0.9, doc="stop when that many of their samples failed for one reason (0 = off)")


@dataclass(frozen=True)
class RunConfig:
    input: InputConfig
    model: ModelConfig
    output: OutputConfig
    preprocess: PreprocessConfig = _f(PreprocessConfig())
    ray: RayConfig = _f(RayConfig())

    @property
    def decode_threads(self) -> int:
        """Decode threads per worker: ``preprocess.decode_workers``, ``auto`` = the worker's CPUs."""
        workers = self.preprocess.decode_workers
        return self.ray.cpus_per_worker if workers == "auto" else workers

    def to_dict(self, redact: bool = True) -> dict:
        data = dataclasses.asdict(self)
        return redact_secrets(data) if redact else data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply ``section.key=value`` overrides, validate into a :class:`RunConfig`."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    config = build(RunConfig, raw, "")
    semantic_checks(config)
    return config


def config_reference(cls: type = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, doc)`` for every config key: what ``--help-config`` prints."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp = _join(prefix, _yaml_name(f)), hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_reference(tp, key)
            continue
        rows.append((key, _type_name(tp), _default_text(f), f.metadata.get("doc", "")))
        entry = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        if dataclasses.is_dataclass(entry):
            rows += config_reference(entry, f"{key}.<name>")
    return rows


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if origin is dict:
        return f"mapping of name -> {typing.get_args(tp)[1].__name__}"
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def apply_override(raw: dict, item: str) -> None:
    """``model.batch_size=128`` -> ``raw['model']['batch_size'] = 128`` (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, naming the dotted key of any problem."""
    where = prefix or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_kind(raw)}")
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])!r}; {where} takes {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                doc = f.metadata.get("doc")
                raise ConfigError(f"missing required key {key!r}" + (f": {doc}" if doc else ""))
            continue
        values[f.name] = _coerce(hints[f.name], raw[name], key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.lower() in ("true", "false") and True in choices:
            value = value.lower() == "true"
        if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
            raise ConfigError(f"{key} = {value!r}; choose one of {list(choices)}")
        return value
    if origin is tuple:
        return _coerce_tuple(typing.get_args(tp), value, key)
    if origin is dict:
        return _coerce_mapping(typing.get_args(tp)[1], value, key)
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_kind(value)}")
        return dict(value)
    return _coerce_scalar(tp, value, key)


def _coerce_mapping(value_type: Any, value: Any, key: str) -> dict:
    """A mapping of names to ``value_type`` (``input.filters``): each entry checked under its own key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {_kind(value)}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: names must be non-empty strings, got {name!r}")
    return {name: _coerce(value_type, v, _join(key, name)) for name, v in value.items()}


def _coerce_union(options: tuple, value: Any, key: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _coerce(option, value, key)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[-1] if len(errors) == 1 else f"{key} = {value!r} is not valid: {'; or '.join(errors)}")


def _coerce_tuple(args: tuple, value: Any, key: str) -> tuple:
    if isinstance(value, str) and args[-1] is Ellipsis:
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {_kind(value)}")
    if args[-1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
    return tuple(_coerce(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args, value)))


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, str):
            raise ConfigError(f"{key} must not be empty")
    raise ConfigError(f"{key} must be {tp.__name__}, got {_kind(value)} {value!r}")


def redact_secrets(data: Any) -> Any:
    """Replace values of secret-looking keys (``secret``, ``token``, ``key`` ...) at any depth."""
    if isinstance(data, dict):
        return {k: ("***" if _is_secret(k, v) else redact_secrets(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_secrets(v) for v in data)
    return data


def _is_secret(key: Any, value: Any) -> bool:
    return isinstance(key, str) and isinstance(value, str) and any(w in key.lower() for w in SECRET_WORDS)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def semantic_checks(config: RunConfig) -> None:
    """Range checks the types cannot express."""
    checks = [
        (config.preprocess.resolution >= 8, "preprocess.resolution must be >= 8"),
        (config.preprocess.min_size >= 0, "preprocess.min_size must be >= 0"),
        (config.preprocess.max_pixels is None or config.preprocess.max_pixels >= 1,
         "preprocess.max_pixels must be >= 1 or unset"),
        (config.preprocess.value_range[0] < config.preprocess.value_range[1],
         "preprocess.value_range must be [low, high] with low < high"),
        (config.preprocess.decode_workers == "auto" or config.preprocess.decode_workers >= 1,
         "preprocess.decode_workers must be >= 1 or auto"),
        (config.model.batch_size >= 1, "model.batch_size must be >= 1"),
        (config.model.micro_batch == "auto" or config.model.micro_batch >= 1, "model.micro_batch must be >= 1 or auto"),
        (config.model.audit_samples >= 0, "model.audit_samples must be >= 0"),
        (0 <= config.model.min_code_agreement <= 1, "model.min_code_agreement must be within [0, 1]"),
        (config.model.fallback_after >= 0, "model.fallback_after must be >= 0"),
        (config.output.codes or config.output.latents, "output.codes and output.latents cannot both be false"),
        (config.ray.num_workers == "auto" or config.ray.num_workers >= 1, "ray.num_workers must be >= 1 or auto"),
        (config.ray.cpus_per_worker >= 1, "ray.cpus_per_worker must be >= 1"),
        (config.ray.max_retries >= 1, "ray.max_retries must be >= 1"),
        (config.ray.shard_timeout_s > 0, "ray.shard_timeout_s must be > 0"),
        (0 <= config.ray.guard_fail_fraction <= 1, "ray.guard_fail_fraction must be within [0, 1]"),
        (bool(config.input.image_keys), "input.image_keys must not be empty"),
        (not config.output.path.startswith("hf://"),
         f"output.path = {config.output.path!r}: vqpipe does not write to the Hugging Face Hub, where every "
         "shard file and commit marker would be its own Hub commit and a large run would hit the Hub's commit "
         "rate limit. Write to a bucket or local disk, then upload the finished folder once with huggingface_hub's "
         "resumable large-folder upload (upload_large_folder / `hf upload-large-folder` in huggingface_hub 0.x, "
         "`hf upload REPO_ID FOLDER --repo-type dataset` in later versions)"),
    ]
    checks += _preprocess_checks(config.preprocess) + _filter_checks(config.input.filters)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _preprocess_checks(cfg: PreprocessConfig) -> list[tuple[bool, str]]:
    return [
        (cfg.max_aspect_ratio is None or cfg.max_aspect_ratio >= 1,
         "preprocess.max_aspect_ratio must be >= 1 (longer side / shorter side) or unset"),
        (bool(cfg.views), "preprocess.views must list at least one view"),
        (len(set(cfg.views)) == len(cfg.views), f"preprocess.views lists a view twice: {list(cfg.views)}"),
        (1.0 <= cfg.crop_range <= 2.0, "preprocess.crop_range must be within [1, 2]"),
        (cfg.decoder == "cpu" or tuple(cfg.views) == ("center",),
         (f"preprocess.decoder: gpu makes the plain center crop only; preprocess.views {list(cfg.views)} needs "
          "preprocess.decoder: cpu")),
    ]


def _filter_checks(filters: dict[str, FilterRule]) -> list[tuple[bool, str]]:
    checks = []
    for name, rule in filters.items():
        key = f"input.filters.{name}"
        checks += [
            (rule.to_dict() != {}, f"{key} sets no bound: give min, max or in"),
            (rule.min is None or rule.max is None or rule.min <= rule.max, f"{key}: min {rule.min} > max {rule.max}"),
            (rule.allowed is None or len(rule.allowed) > 0, f"{key}.in must list at least one value"),
        ]
    return checks
