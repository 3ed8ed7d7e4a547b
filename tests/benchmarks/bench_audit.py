"""What the fidelity audit costs: a shard through ``process_shard`` with the audit off and on, the
audit's time as a share of the shard's encode time. Not a test; run:

    python tests/benchmarks/bench_audit.py [--images 512] [--precision fp16] [--samples 8]

The audit's cost is fixed per shard (``--samples`` images re-encoded in fp32 and decoded) while the
encode time grows with the shard, so the share is also given for a 10,000-image shard
(img2dataset's default shard size) from the measured encode time per image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vqpipe.bench.inputs import bench_samples, write_shard
from vqpipe.config import load_config
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model
from vqpipe.run.shard_job import make_settings, process_shard

TYPICAL_SHARD = 10_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--samples", type=int, default=load_config("configs/demo.yaml").model.audit_samples)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    images, source = bench_samples(config, args.images, None)
    model = load_model(config.model)
    encoder = TokenEncoder(model, torch.device("cpu"), args.precision, False, config.model.batch_size,
                           config.preprocess.value_range, config.model.micro_batch)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        url = write_shard(Path(tmp) / "shard.tar", images)
        job = make_settings(config.input, config.preprocess, config.output.__class__(path=f"{tmp}/out"), model,
                            encoder.precision, args.samples)
        process_shard(write_shard(Path(tmp) / "warm.tar", images[:16]), "warm", job, encoder, pool)
        result = process_shard(url, "audited", job, encoder, pool)
    times, audit = result.times, result.audit
    per_image = times.encode_s / result.rows
    print(f"{args.config}: {result.rows} images ({source}), {args.precision}, {args.threads} torch threads, "
          f"{config.preprocess.resolution}px, load average {os.getloadavg()[0]:.1f}")
    print(f"encode {times.encode_s:.1f} s ({1 / per_image:.1f} img/s), audit of {audit['samples']} images "
          f"{times.audit_s:.2f} s = {times.audit_s / times.encode_s:.2%} of the encode time; for a "
          f"{TYPICAL_SHARD}-image shard {times.audit_s / (per_image * TYPICAL_SHARD):.2%}")
    print(f"audit: codes agree {audit['code_agreement']:.2%}, PSNR mean {audit['psnr_db']['mean']:.2f} dB")


if __name__ == "__main__":
    main()
