"""Train the demo VQ tokenizer shipped in ``vqpipe/assets/demo-vq``, on CPU, in minutes.

    python -m vqpipe.demo.train_tokenizer --out vqpipe/assets/demo-vq [--minutes 20] [--seed 0]

Data: random crops of scikit-image's public-domain / CC0 colour photos (:data:`TRAIN_PHOTOS`), each
taken from the photo rescaled by a random factor and randomly flipped. Whole photos
(:data:`HELDOUT_PHOTOS`) are held out; :func:`evaluate_heldout` reconstructs a fixed set of crops of
them at the demo resolution, and the tests call it on the shipped model.

Recipe: a short autoencoder warm-up without quantization, then the codebook is initialised by
k-means on encoder outputs and training continues through the model's own ``quantize`` (diffusers'
losses, straight-through estimator), re-seeding unused codewords from recent encoder outputs. Adam
with warm-up and cosine decay, scheduled over the budget: ``--minutes`` of CPU time per thread
(about the wall time on an idle machine; longer on a shared one), or ``--steps``. Finally
``scaling_factor`` is set to ``1 / std`` of the pre-quantization latents on training crops (the
LDM convention) and the model card is written next to the weights.

Needs scikit-image (``pip install 'vqpipe[train]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqpipe.model import VQModel
from vqpipe.model.quantizer import nearest_codes

log = logging.getLogger(__name__)

DEMO_RESOLUTION = 128
DEMO_CONFIG = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=1024,
    # 8 groups = 4 channels per group at the 32-channel level, the ratio of diffusers' released f4
    # VQ (128 channels, 32 groups). 32 groups would make the first and last norms per-channel
    # instance norms, which erase each crop's mean colour: after 150 steps 14.5 dB vs 19.0 held out.
    norm_num_groups=8,
    sample_size=DEMO_RESOLUTION,
)
# skimage.data loader -> licence, as its docstring states it. Only explicit public-domain / CC0
# photos: immunohistochemistry ("no known copyright restrictions") and stereo_motorcycle (no
# licence stated) are left out on purpose.
TRAIN_PHOTOS = {
    "astronaut": "public domain (NASA)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "rocket": "public domain (SpaceX)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 (Mikael Häggström, Wikimedia Commons)",
}
HELDOUT_PHOTOS = {"coffee": "CC0 (Rachel Michetti)"}


# -- photos ----------------------------------------------------------------------------------------

def _skimage_data():
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the demo tokenizer's training data and evaluation need scikit-image: "
                          "pip install 'vqpipe[train]'") from err
    return skimage.data


def load_photo(name: str) -> torch.Tensor:
    """A ``skimage.data`` colour photo as ``(3, H, W)`` float32 in ``[-1, 1]``."""
    array = getattr(_skimage_data(), name)()
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB photo (shape {array.shape})")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 127.5 - 1.0


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` -> ``(3, *size)``; antialiased, so downscaling does not alias fine texture."""
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


# -- held-out evaluation (the tests run this on the shipped model) ---------------------------------

def _grid_crops(image: torch.Tensor, size: int, rows: int, cols: int) -> list[torch.Tensor]:
    ys = np.linspace(0, image.shape[1] - size, rows).round().astype(int)
    xs = np.linspace(0, image.shape[2] - size, cols).round().astype(int)
    return [image[:, y:y + size, x:x + size] for y in ys for x in xs]


def _whole_photo(image: torch.Tensor, size: int) -> torch.Tensor:
    side = min(image.shape[1:])
    top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
    return resize(image[:, top:top + side, left:left + side], (size, size))


def heldout_crops(resolution: int = DEMO_RESOLUTION) -> torch.Tensor:
    """The fixed evaluation set, ``(N, 3, r, r)`` in ``[-1, 1]``: per held-out photo a 3x4 grid of
    crops at native scale, a 1x2 grid at half scale, and the centre square downscaled whole."""
    crops = []
    for name in HELDOUT_PHOTOS:
        photo = load_photo(name)
        half = resize(photo, (photo.shape[1] // 2, photo.shape[2] // 2))
        crops += _grid_crops(photo, resolution, rows=3, cols=4)
        crops += _grid_crops(half, resolution, rows=1, cols=2)
        crops.append(_whole_photo(photo, resolution))
    return torch.stack(crops).contiguous()


@torch.no_grad()
def reconstruct(model: VQModel, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images -> codes -> images, the path the pipeline's tokens take (``tokenize``, ``decode_codes``)."""
    model.eval()
    out = [model.decode_codes(model.tokenize(chunk)[0]) for chunk in images.split(batch_size)]
    return torch.cat(out).clamp(-1.0, 1.0)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[-1, 1]`` images, with the peak at the full ``[0, 1]`` range."""
    mse = ((reconstruction - target) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def evaluate_heldout(model: VQModel, crops: torch.Tensor | None = None) -> float:
    """Mean PSNR (dB) of reconstructions of :func:`heldout_crops`."""
    crops = heldout_crops() if crops is None else crops
    return psnr(reconstruct(model, crops), crops).mean().item()


# -- training data ---------------------------------------------------------------------------------

class CropSampler:
    """Random ``size x size`` crops of ``photos``, each from its photo rescaled by a factor drawn
    uniformly in ``[min_scale, 1]`` (never below what fits the photo) and flipped half the time."""

    def __init__(self, photos: list[torch.Tensor], size: int, min_scale: float, rng: np.random.Generator):
        self.photos, self.size, self.min_scale, self.rng = photos, size, min_scale, rng

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self._crop() for _ in range(n)])

    def _crop(self) -> torch.Tensor:
        photo = self.photos[self.rng.integers(len(self.photos))]
        height, width = photo.shape[1:]
        scale = self.rng.uniform(max(self.min_scale, self.size / min(height, width)), 1.0)
        # Cropping a (size / scale) window and resizing it equals rescaling the photo, then cropping.
        window = min(round(self.size / scale), height, width)
        top, left = self.rng.integers(height - window + 1), self.rng.integers(width - window + 1)
        crop = photo[:, top:top + window, left:left + window]
        if window != self.size:
            crop = resize(crop, (self.size, self.size))
        return crop.flip(-1) if self.rng.random() < 0.5 else crop


# -- codebook --------------------------------------------------------------------------------------

def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on ``(N, D)`` points -> ``(k, D)`` centroids; empty clusters re-seeded."""
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = nearest_codes(points, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().squeeze(1)
        centroids[empty] = points[torch.randint(len(points), (len(empty),), generator=generator)]
    return centroids


class CodeUsage:
    """Counts of codeword hits since the last :meth:`reset`."""

    def __init__(self, num_codes: int):
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def add(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.reshape(-1), minlength=len(self.counts))

    def used_fraction(self) -> float:
        return (self.counts > 0).float().mean().item()

    def perplexity(self) -> float:
        """``exp(entropy)`` of the hit distribution: the number of equally used codes it equals."""
        p = self.counts.float() / self.counts.sum().clamp_min(1)
        return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())

    def reset(self) -> None:
        self.counts.zero_()


def restart_dead_codes(model: VQModel, optimizer: torch.optim.Optimizer, dead: torch.Tensor,
                       recent: torch.Tensor, generator: torch.Generator) -> int:
    """Re-seed the ``dead`` codewords on random ``recent`` encoder outputs (``(N, D)``), jittered so
    two restarts on one output split apart; their Adam moments are zeroed, being about other points."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return 0
    weight = model.quantize.embedding.weight
    pick = torch.randint(len(recent), (len(idx),), generator=generator)
    noise = torch.randn(len(idx), recent.shape[1], generator=generator) * 0.01 * recent.std()
    with torch.no_grad():
        weight[idx] = recent[pick] + noise
    for moment in optimizer.state.get(weight, {}).values():
        if torch.is_tensor(moment) and moment.shape == weight.shape:
            moment[idx] = 0
    return len(idx)


def init_codebook(model: VQModel, sampler: CropSampler, batches: int, batch_size: int,
                  generator: torch.Generator) -> None:
    """k-means of encoder outputs on fresh crops -> codebook, so every codeword starts in use."""
    with torch.no_grad():
        h = torch.cat([_flat(model.encode(sampler.batch(batch_size)).latents) for _ in range(batches)])
        model.quantize.embedding.weight.copy_(kmeans(h, model.config.num_vq_embeddings, 20, generator))
    log.info("codebook initialised by k-means on %d encoder outputs", len(h))


def _flat(h: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` -> ``(B*h*w, D)``, the rows the quantizer matches."""
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


# -- training --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """The command line, validated."""

    out: Path
    minutes: float = 20.0
    steps: int | None = None  # fixed step count (a reproducible schedule) instead of the time budget
    seed: int = 0
    # Per CPU-second, batch 8 at lr 2e-3 beat batch 16 at lr 1e-3 clearly (17.1 vs 14.8 dB held out
    # after the same 2.6M training pixels): this run is step-starved, not noise-limited.
    batch_size: int = 8
    crop: int = 64
    min_scale: float = 0.25
    lr: float = 2e-3
    warmup_fraction: float = 0.1  # share of the run trained without quantization
    restart_every: int = 100
    latent_channels: int = 4  # = vq_embed_dim; the rest of the architecture is DEMO_CONFIG
    # Extra commitment weight on top of the quantizer's own 0.25: pulls encoder outputs onto their
    # codewords, away from cell boundaries, so small numeric noise (bf16 autocast, float16 latents)
    # flips fewer codes.
    commitment: float = 0.0
    eval_minutes: float = 4.0
    threads: int = 0  # 0: the CPUs this process may use, at most 8

    def resolved(self) -> "TrainConfig":
        """This config with ``threads`` made concrete."""
        if self.threads:
            return self
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return dataclasses.replace(self, threads=min(available, 8))

    def validate(self) -> None:
        if self.minutes <= 0 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"need a positive budget, got minutes={self.minutes}, steps={self.steps}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if self.commitment < 0:
            raise ValueError(f"commitment must be >= 0, got {self.commitment}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.crop % 4 or self.crop < 16:
            raise ValueError(f"crop must be a multiple of 4 (the model's downsampling) and >= 16, got {self.crop}")


@dataclass
class Budget:
    """Progress in ``[0, 1]``: by steps when a step count is fixed, else by this process's CPU time.

    CPU time, not wall clock: on a shared machine the run takes longer but trains the same model
    (a wall-clock budget there gave a quarter of the steps and a useless model).
    """

    seconds: float  # on ``threads`` dedicated cores
    steps: int | None
    threads: int
    start: float = field(default_factory=time.process_time)

    def elapsed(self) -> float:
        """CPU seconds used per thread: about the wall seconds an idle machine takes."""
        return (time.process_time() - self.start) / self.threads

    def progress(self, step: int) -> float:
        return step / self.steps if self.steps else self.elapsed() / self.seconds


def lr_at(progress: float, peak: float, warmup: float = 0.02, floor: float = 0.02) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then cosine decay to ``floor * peak``."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    steps: int = 0
    cpu_seconds: float = 0.0  # per thread, see Budget
    wall_seconds: float = 0.0
    restarted_codes: int = 0
    heldout_psnr: list[tuple[int, float]] = field(default_factory=list)  # (step, dB) at each check


def build_model(seed: int, latent_channels: int = 4) -> VQModel:
    # Weight init draws from torch's global generator; fork it so the seed stays local to this call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(**dict(DEMO_CONFIG, latent_channels=latent_channels, vq_embed_dim=latent_channels))


def train_step(model: VQModel, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               quantize: bool, commitment: float = 0.0) -> tuple[float, torch.Tensor | None, torch.Tensor]:
    """One Adam step on MSE (+ the quantizer's codebook/commitment loss, + ``commitment`` times
    the extra commitment term) -> (mse, codes, h)."""
    h = model.encode(batch).latents
    codes, vq_loss, latents = None, 0.0, h
    if quantize:
        latents, vq_loss, (_, _, codes) = model.quantize(h)
        vq_loss = vq_loss + commitment * F.mse_loss(h, latents.detach())  # latents: the codewords' values
    reconstruction = model.decode(latents, force_not_quantize=True).sample
    mse = F.mse_loss(reconstruction, batch)
    optimizer.zero_grad(set_to_none=True)
    (mse + vq_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return mse.item(), codes, h.detach()


class Trainer:
    """One training run: its optimizer, RNG, schedule and the code usage of the current window."""

    def __init__(self, cfg: TrainConfig, model: VQModel, sampler: CropSampler, eval_crops: torch.Tensor):
        self.cfg, self.model, self.sampler, self.eval_crops = cfg, model, sampler, eval_crops
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.usage, self.result = CodeUsage(model.config.num_vq_embeddings), TrainResult()
        self.quantize, self.mse_sum = False, 0.0

    def run(self) -> TrainResult:
        budget, wall_start = Budget(self.cfg.minutes * 60, self.cfg.steps, self.cfg.threads), time.monotonic()
        next_eval = self.cfg.eval_minutes * 60
        while (progress := budget.progress(self.result.steps)) < 1.0:
            h = self.step(progress)
            if self.result.steps % self.cfg.restart_every == 0:
                self.end_window(progress, h)
            if budget.elapsed() >= next_eval:
                next_eval += self.cfg.eval_minutes * 60
                self.check_heldout()
        self.result.cpu_seconds, self.result.wall_seconds = budget.elapsed(), time.monotonic() - wall_start
        return self.result

    def step(self, progress: float) -> torch.Tensor:
        """One optimizer step (quantizing once the warm-up is over) -> the batch's latents ``h``."""
        if not self.quantize and progress >= self.cfg.warmup_fraction:
            init_codebook(self.model, self.sampler, 8, self.cfg.batch_size, self.generator)
            self.quantize = True
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(progress, self.cfg.lr)
        mse, codes, h = train_step(self.model, self.optimizer, self.sampler.batch(self.cfg.batch_size), self.quantize,
                                 self.cfg.commitment)
        self.result.steps, self.mse_sum = self.result.steps + 1, self.mse_sum + mse
        if codes is not None:
            self.usage.add(codes)
        return h

    def end_window(self, progress: float, h: torch.Tensor) -> None:
        """Log the window, re-seed the codewords it never used, start the next window."""
        _log_progress(self.result.steps, progress, self.mse_sum / self.cfg.restart_every,
                      self.usage if self.quantize else None)
        if self.quantize and progress < 0.85:  # leave the last stretch to settle on a fixed set of codes
            self.result.restarted_codes += restart_dead_codes(self.model, self.optimizer, self.usage.counts == 0,
                                                              _flat(h), self.generator)
        self.usage.reset()
        self.mse_sum = 0.0

    def check_heldout(self) -> None:
        if self.quantize:
            self.result.heldout_psnr.append((self.result.steps, evaluate_heldout(self.model, self.eval_crops)))
            log.info("step %d: held-out PSNR %.2f dB", self.result.steps, self.result.heldout_psnr[-1][1])


def _log_progress(step: int, progress: float, mse: float, usage: CodeUsage | None) -> None:
    train_psnr = 10 * math.log10(4.0 / max(mse, 1e-10))  # MSE of [-1, 1] images; peak-to-peak is 2
    if usage is None:
        log.info("step %d (%.0f%%, no quantization): train PSNR %.2f dB", step, 100 * progress, train_psnr)
    else:
        log.info("step %d (%.0f%%): train PSNR %.2f dB, codes used %.1f%%, perplexity %.0f", step, 100 * progress,
                 train_psnr, 100 * usage.used_fraction(), usage.perplexity())


# -- finishing -------------------------------------------------------------------------------------

@torch.no_grad()
def latent_std(model: VQModel, sampler: CropSampler, batches: int, batch_size: int) -> float:
    model.eval()
    return torch.cat([model.encode(sampler.batch(batch_size)).latents.flatten() for _ in range(batches)]).std().item()


def with_scaling_factor(model: VQModel, scaling_factor: float) -> VQModel:
    """A copy of ``model`` whose config carries ``scaling_factor`` (the config is immutable)."""
    out = VQModel.from_config(dataclasses.replace(model.config, scaling_factor=scaling_factor))
    out.load_state_dict(model.state_dict())
    return out.eval()


@torch.no_grad()
def code_usage(model: VQModel, images: torch.Tensor) -> CodeUsage:
    usage = CodeUsage(model.config.num_vq_embeddings)
    for chunk in images.split(8):
        usage.add(model.tokenize(chunk)[0])
    return usage


@torch.no_grad()
def bf16_code_agreement(model: VQModel, images: torch.Tensor) -> float:
    """Share of code positions where ``tokenize`` under bf16 autocast picks the fp32 code."""
    fp32 = torch.cat([model.tokenize(chunk)[0] for chunk in images.split(8)])
    bf16 = torch.cat([model.tokenize(chunk, autocast_dtype=torch.bfloat16)[0] for chunk in images.split(8)])
    return (fp32 == bf16).float().mean().item()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m vqpipe.demo.train_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for config.json, weights and README.md")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "out":
            kind = int if f.name == "steps" else type(f.default)
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_args(argv).resolved()
    torch.set_num_threads(cfg.threads)
    # Denormal floats run ~100x slower on x86 CPUs; weights and gradients drifting through them stall steps.
    torch.set_flush_denormal(True)
    log.info("training: %s", cfg)
    rng = np.random.default_rng(cfg.seed)
    photos = [load_photo(name) for name in TRAIN_PHOTOS]
    eval_crops = heldout_crops()
    model = build_model(cfg.seed, cfg.latent_channels)
    result = Trainer(cfg, model, CropSampler(photos, cfg.crop, cfg.min_scale, rng), eval_crops).run()
    big_crops = CropSampler(photos, DEMO_RESOLUTION, cfg.min_scale, rng)
    final = with_scaling_factor(model, 1.0 / latent_std(model, big_crops, 4, 16))
    final.save_pretrained(str(cfg.out))
    heldout = evaluate_heldout(final, eval_crops)
    train_usage, heldout_usage = code_usage(final, big_crops.batch(64)), code_usage(final, eval_crops)
    log.info("done in %.1f min, %d steps: held-out PSNR %.2f dB; codes used %.1f%% on 64 training crops "
             "(perplexity %.0f), %.1f%% on the held-out crops", result.wall_seconds / 60, result.steps, heldout,
             100 * train_usage.used_fraction(), train_usage.perplexity(), 100 * heldout_usage.used_fraction())
    bf16 = bf16_code_agreement(final, eval_crops)
    log.info("bf16-autocast codes agree with fp32 codes on %.2f%% of held-out positions", 100 * bf16)
    card = model_card(final, cfg, result, Scores(heldout, bf16, train_usage), len(eval_crops))
    (cfg.out / "README.md").write_text(card)


@dataclass
class Scores:
    """What the finished model is judged by: held-out PSNR (dB), bf16/fp32 code agreement, training-crop code usage."""

    heldout_psnr: float
    bf16_agreement: float
    usage: CodeUsage


def model_card(model: VQModel, cfg: TrainConfig, result: TrainResult, scores: Scores, n_eval: int) -> str:
    always = ("out", "seed") if cfg.steps else ("out", "minutes", "seed")  # a step count overrides minutes
    command = "python -m vqpipe.demo.train_tokenizer " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in dataclasses.asdict(cfg).items()
        if k in always or (v != getattr(TrainConfig, k, None) and not (k == "minutes" and cfg.steps)))
    photos = "\n".join(f"| `{n}` | {lic} | {role} |" for role, table in (("train", TRAIN_PHOTOS),
                       ("held out", HELDOUT_PHOTOS)) for n, lic in table.items())
    checks = ", ".join(f"{db:.2f} dB @ step {s}" for s, db in result.heldout_psnr) or "none"
    return _CARD.format(
        config=json.dumps(model.config.to_dict(), indent=2), command=command, seed=cfg.seed, steps=result.steps,
        cpu_minutes=result.cpu_seconds / 60, wall_minutes=result.wall_seconds / 60, torch=torch.__version__,
        heldout=scores.heldout_psnr, n_eval=n_eval,
        res=DEMO_RESOLUTION, res4=DEMO_RESOLUTION // 4, warm=100 * cfg.warmup_fraction, checks=checks,
        used=100 * scores.usage.used_fraction(), perplexity=scores.usage.perplexity(), bf16=100 * scores.bf16_agreement,
        restarts=result.restarted_codes, scaling=model.config.scaling_factor, photos=photos, cfg=cfg,
        extra_commitment=f" + {cfg.commitment} x an extra commitment term `mse(h, sg(codeword))`"
        if cfg.commitment else "")


_CARD = """\
# demo-vq: a demo-sized VQ tokenizer (f4, 1024 codes)

A small `VQModel` (diffusers format) trained on CPU by `vqpipe/demo/train_tokenizer.py`, so the
tests and the demo have a tokenizer whose reconstructions mean something. It is a demo model:
trained on five photos for minutes, it is no substitute for a real tokenizer.

## Use

```python
from vqpipe import VQModel
model = VQModel.from_pretrained("vqpipe/assets/demo-vq")  # diffusers.VQModel loads it too
codes, latents = model.tokenize(images)  # images (B, 3, {res}, {res}) in [-1, 1] -> codes (B, {res4}, {res4})
```

## Config

```json
{config}
```

`scaling_factor` = 1 / std of the pre-quantization latents `h` on 64 training crops of {res}x{res}
(the LDM convention).

## Training

- Command: `{command}`
- Seed: {seed}; {steps} steps on {cfg.threads} CPU threads (torch {torch}): {cpu_minutes:.1f} min of CPU time
  per thread (the budget: about the wall time on an idle machine), {wall_minutes:.1f} min of wall time.
- Data: random {cfg.crop}x{cfg.crop} crops (batch {cfg.batch_size}) of the training photos, each
  photo rescaled by a random factor in [{cfg.min_scale}, 1] (antialiased), flipped horizontally
  half the time; pixels in [-1, 1].
- Loss: MSE + the quantizer's own loss (diffusers' codebook + 0.25 commitment, straight-through
  estimator){extra_commitment}. The first {warm:.0f}% of the run trains without quantization; the codebook is then initialised by k-means
  on encoder outputs, and codewords unused for {cfg.restart_every} steps are re-seeded from recent
  encoder outputs ({restarts} re-seeds in all).
- Optimiser: Adam, lr {cfg.lr} with 2% warm-up and cosine decay to 2%, gradient norm clipped at 1,
  scheduled over the CPU-time budget.

## Evaluation

Held-out mean PSNR: **{heldout:.2f} dB** over {n_eval} fixed {res}x{res} crops of the held-out photo
(`vqpipe.demo.train_tokenizer.heldout_crops`: a 3x4 grid at native scale, a 1x2 grid at half
scale and the whole photo's centre square downscaled), reconstructed image -> codes -> image.
Checks during training: {checks}.

Codebook usage on 64 random {res}x{res} training crops: {used:.1f}% of codes used, perplexity {perplexity:.0f}.

## Precision

Under bf16 autocast (`model.tokenize(x, autocast_dtype=torch.bfloat16)`) the codes agree with the
fp32 codes on {bf16:.1f}% of the held-out positions. The flips are between neighbouring codewords:
1024 codewords in 4 dimensions sit closer together than bf16's rounding of the input image and of
the latents `h` (about 0.3% relative), so a few percent of positions land on the other side of a
cell boundary; the reconstructions barely change (see `tests/test_demo_tokenizer.py`).

## Data and licences

All photos ship with scikit-image (`skimage.data`); licences as stated in their loaders' docstrings.

| photo | licence | role |
|---|---|---|
{photos}

`immunohistochemistry` ("no known copyright restrictions") and `stereo_motorcycle` (no licence
stated) were left out, as were the grey-level images.

The weights are released under the project's licence (Apache-2.0).
"""


if __name__ == "__main__":
    main()
