"""The Hugging Face dataset card (``README.md``) of a vqpipe output, for ``vqpipe publish``.

The YAML header is what ``datasets`` reads: ``configs`` points the default config at the top-level
Parquet files, and ``dataset_info.features`` declares every column, the token grids as fixed-shape
arrays (``array2_d`` codes, ``array3_d`` latents; one more axis for views), so
``load_dataset(REPO_ID)`` returns arrays of the right shape and dtype without guessing. The body is
for people: lineage, ``vqpipe inspect``'s figures, the decode check, and how to read the data.
Everything here comes from the redacted manifest and the data files' own metadata: never from
``storage_options`` or the environment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import yaml

from vqpipe.model import hub
from vqpipe.read.inspect import OutputStats, format_text

DATA_FILES = "*.parquet"  # top level only: fsspec's * does not cross "/", so _vqpipe/ stays out
_ARRAY_KINDS = {2: "array2_d", 3: "array3_d", 4: "array4_d", 5: "array5_d"}


@dataclass
class CardInputs:
    """What the card is written from; all of it is safe to publish."""

    repo_id: str
    schema: pa.Schema  # the first data file's (the columns every file shares)
    metadata: dict  # its ``vqpipe`` key-value metadata
    manifest: dict | None  # ``_vqpipe/run.json``, redacted
    stats: OutputStats
    decode: dict | None  # ``_vqpipe/decode/report.json`` without the per-sample rows, when decode ran
    grid: str | None  # repo path of the decode grid picture, when decode ran
    partial: list[str]  # why the output is incomplete (``--allow-partial``); empty when complete


def features(schema: pa.Schema) -> list[dict]:
    """``dataset_info.features`` in the card's YAML form, one entry per column."""
    return [_feature(field.name, field.type) for field in schema]


def _feature(name: str, type_: pa.DataType) -> dict:
    shape = []
    while pa.types.is_fixed_size_list(type_):
        shape.append(type_.list_size)
        type_ = type_.value_type
    # datasets names dtypes as NumPy does ("float16"); Arrow calls that one "halffloat".
    dtype = "string" if pa.types.is_string(type_) else np.dtype(type_.to_pandas_dtype()).name
    if not shape:
        return {"name": name, "dtype": dtype}
    if len(shape) == 1:
        return {"name": name, "list": dtype, "length": shape[0]}
    if len(shape) not in _ARRAY_KINDS:
        raise ValueError(f"column {name}: {len(shape)}-D arrays have no datasets feature (2-D to 5-D)")
    return {"name": name, "dtype": {_ARRAY_KINDS[len(shape)]: {"shape": shape, "dtype": dtype}}}


def header(inputs: CardInputs) -> dict:
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "dataset_info": {"features": features(inputs.schema)},
        "tags": ["vqpipe", "image-tokens", "vq"] + (["latents"] if "latents" in inputs.schema.names else []),
    }


def render(inputs: CardInputs) -> str:
    """The whole ``README.md``: YAML header, then the body."""
    front = yaml.safe_dump(header(inputs), sort_keys=False)
    sections = [_title(inputs), _lineage(inputs), _stats(inputs), _decode(inputs), _reading(inputs)]
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def _title(inputs: CardInputs) -> str:
    what = " and ".join(c for c in ("codes", "latents") if c in inputs.schema.names)
    text = (f"# {inputs.repo_id}\n\nVQ {what} of an image corpus, written by vqpipe "
            f"{inputs.metadata.get('vqpipe_version', '')}: one Parquet file per input shard, one row per image.")
    if inputs.partial:
        text += "\n\n**Incomplete output** (published with `--allow-partial`): " + "; ".join(inputs.partial) + "."
    return text


def _lineage(inputs: CardInputs) -> str:
    meta, model = inputs.metadata, _model_section(inputs.manifest)
    rows = {
        "model path": public_url(model.get("path", "")) or "-",
        "model revision": _revision(model.get("path", "")),
        "model subfolder": model.get("subfolder") or "-",
        "weights sha256": meta.get("weights_sha256"),
        "scaling factor": meta.get("scaling_factor"),
        "codebook size": meta.get("num_vq_embeddings"),
        "token grid (h, w)": meta.get("codes_shape"),
        "latent shape (C, h, w)": meta.get("latent_shape"),
        "latent dtype": meta.get("latent_dtype"),
        "resolution": meta.get("resolution"),
        "value range": meta.get("value_range"),
        "precision": meta.get("precision"),
        "image fields": meta.get("image_keys"),
    }
    table = "\n".join(f"| {k} | `{v}` |" for k, v in rows.items())
    config = json.dumps(meta.get("model_config", {}), indent=1, sort_keys=True)
    latents = f"`latents` hold {meta.get('latents', '-')}.\n\n" if "latents" in inputs.schema.names else ""
    return f"## Lineage\n\n| | |\n|---|---|\n{table}\n\n{latents}Model config:\n\n```json\n{config}\n```"


def _model_section(manifest: dict | None) -> dict:
    return ((manifest or {}).get("config") or {}).get("model") or {}


def _revision(path: str) -> str:
    if not hub.is_hub_path(path):
        return "-"
    return hub.parse(path).revision or "default branch (not pinned)"


def public_url(url: str) -> str:
    """``url`` without user info or query: a presigned or token-carrying URL keeps only its place."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def _stats(inputs: CardInputs) -> str:
    # format_text names the output folder on its first line: a local path, not the card's business.
    lines = format_text(inputs.stats).splitlines()[1:]
    return "## Contents (`vqpipe inspect`)\n\n```text\n" + "\n".join(lines) + "\n```"


def _decode(inputs: CardInputs) -> str:
    if inputs.decode is None:
        return ""
    checks = "\n".join(f"| {c.get('name')} | {'ok' if c.get('ok') else 'FAILED'} | {c.get('figure')} |"
                       for c in inputs.decode.get("checks", []))
    mean = inputs.decode.get("mean_psnr")
    text = (f"## Fidelity (`vqpipe decode`)\n\nMean PSNR of decoded samples against their originals: "
            f"{f'{mean:.2f} dB' if mean is not None else '-'}.\n\n| check | result | figure |\n|---|---|---|\n{checks}")
    if inputs.grid:
        text += f"\n\n![originals and reconstructions]({inputs.grid})"
    return text


def _reading(inputs: CardInputs) -> str:
    repo = inputs.repo_id
    return f"""## Reading

```python
from datasets import load_dataset

ds = load_dataset("{repo}", split="train").with_format("numpy")
ds[:4]["codes"].shape          # (4, h, w); stored uint16, widened to int64 by the numpy format
```

```python
import polars as pl

frame = pl.read_parquet("hf://datasets/{repo}/*.parquet")
```

```python
import duckdb

duckdb.sql("SELECT key, codes FROM 'hf://datasets/{repo}/*.parquet' LIMIT 4")
```

```python
from huggingface_hub import snapshot_download
from vqpipe.read.dataset import TokenDataset

local = snapshot_download("{repo}", repo_type="dataset", allow_patterns="*.parquet")
dataset = TokenDataset(local, shuffle_buffer=10_000, seed=0)   # codes (h, w) int64, latents (C, h, w) float32
```

Latents are stored multiplied by the scaling factor above; divide by it before the model's decoder."""
