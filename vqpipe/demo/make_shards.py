"""Write the demo input shards the package ships: public-domain / CC0 photos bundled with
scikit-image, laid out as img2dataset writes LAION shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

    python -m vqpipe.demo.make_shards --out vqpipe/assets/demo-shards

Each shard also holds one damaged JPEG and one sample without an image, so the demo shows how
bad inputs are skipped and accounted for. Needs the ``train`` extra (scikit-image).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (caption, licence); only images whose scikit-image docstring states PD or CC0.
PHOTOS = {
    "astronaut": ("Astronaut Eileen Collins in a NASA portrait", "public domain (NASA)"),
    "chelsea": ("Chelsea the cat", "CC0 (Stefan van der Walt)"),
    "coffee": ("A cup of coffee on a saucer", "CC0 (Rachel Michetti)"),
    "rocket": ("A SpaceX Falcon 9 rocket on the launch pad", "public domain (SpaceX)"),
    "hubble_deep_field": ("The Hubble deep field", "public domain (NASA)"),
    "retina": ("Fundus photograph of a normal left eye", "CC0 (Mikael Haggstrom)"),
    "immunohistochemistry": ("Colonic glands stained for FHL2 protein", "no known copyright restrictions"),
}
SHARDS = 4
LONG_SIDE = 320


def photo(name: str) -> Image.Image:
    try:
        from skimage import data
    except ImportError as err:
        raise SystemExit("making the demo shards needs scikit-image: pip install 'vqpipe[train]'") from err
    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def variants(img: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """The whole photo plus a random crop, each resized so the long side is LONG_SIDE."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.5, 0.8)), int(h * rng.uniform(0.5, 0.8))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = []
    for im in (img, img.crop((x, y, x + cw, y + ch))):
        scale = LONG_SIDE / max(im.size)
        out.append(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                             Image.Resampling.BICUBIC))
    return out


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0  # fixed mtime: the shards are byte-reproducible
    tar.addfile(info, io.BytesIO(data))


def samples(seed: int) -> list[tuple[str, bytes | None, str, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for name, (caption, licence) in PHOTOS.items():
        for i, img in enumerate(variants(photo(name), rng)):
            meta = {"source": f"skimage.data.{name}", "licence": licence, "crop": i > 0,
                    "width": img.width, "height": img.height}
            out.append((f"{name}-{i}", jpeg(img), caption, meta))
    return out


def write_shards(out: Path, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    items = samples(seed)
    paths = []
    for s in range(SHARDS):
        path = out / f"demo-{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, (name, image, caption, meta) in enumerate(items[s::SHARDS]):
                key = f"{s:05d}{k:04d}"
                add(tar, f"{key}.jpg", image)
                add(tar, f"{key}.txt", caption.encode())
                add(tar, f"{key}.json", json.dumps({"key": key, **meta}).encode())
            bad_key, empty_key = f"{s:05d}0900", f"{s:05d}0901"
            add(tar, f"{bad_key}.jpg", items[s][1][: len(items[s][1]) // 3])  # truncated JPEG: decode_error
            add(tar, f"{bad_key}.txt", b"a damaged download")
            add(tar, f"{empty_key}.txt", b"a sample whose image never downloaded")  # no_image
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("vqpipe/assets/demo-shards"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_shards(args.out, args.seed):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
