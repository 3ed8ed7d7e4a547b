"""Where reduced precision moves a tokenizer's codes, on the demo's held-out crops. Not a test; run:

    python tests/benchmarks/bench_precision.py [--model vqpipe/assets/demo-vq]

First a table for the README's fidelity section: per precision vqpipe runs on a CPU (fp32, fp16,
bf16 autocast), the share of code positions equal to fp32's and the speed (eager, ``--threads``
torch threads, medians of ``--repeats``). Then, against the fp32 codes: agreement under full bf16 autocast; with only the input image
rounded to bf16 (everything else fp32); with only the encoder's down blocks under bf16 (mid block,
output convolutions and ``quant_conv`` in fp32); and after storing ``h * scaling_factor`` as float16
and re-quantizing (what the decode job's consistency check does). Also how close encoder outputs
sit to a cell boundary: (second-nearest - nearest codeword distance) / |h|, as quantiles.
Slow on CPUs without AVX512-BF16/AMX (bf16 convolutions take a ~30x slower path).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vqpipe import VQModel
from vqpipe.demo.train_tokenizer import evaluate_heldout, heldout_crops
from vqpipe.encode import precision


def precision_table(model: VQModel, x: torch.Tensor, codes: torch.Tensor, repeats: int) -> list[str]:
    """Markdown rows: precision | codes equal to fp32 | img/s."""
    rows = ["| precision | codes equal to fp32 | img/s (CPU, eager) |", "|---|---:|---:|"]
    for name in ("fp32", "fp16", "bf16"):
        dtype = precision.autocast_dtype(name)
        model.tokenize(x[:2], autocast_dtype=dtype)  # first-call costs out of the clock
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            other = model.tokenize(x, autocast_dtype=dtype)[0]
            seconds.append(time.perf_counter() - started)
        share = (other == codes).float().mean().item()
        rows.append(f"| {name} | {100 * share:.2f}% | {len(x) / statistics.median(seconds):.1f} |")
    return rows


def down_blocks_bf16(model: VQModel, x: torch.Tensor) -> torch.Tensor:
    """``h`` with only the encoder's conv_in and down blocks under bf16 autocast."""
    encoder = model.encoder
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = encoder.conv_in(x)
        for block in encoder.down_blocks:
            y = block(y)
    y = encoder.mid_block(y.float())
    return model.quant_conv(encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(y))))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vqpipe/assets/demo-vq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = VQModel.from_pretrained(args.model).eval()
    x = heldout_crops()
    h = model.quant_conv(model.encoder(x))
    codes = model.quantize.codes(h)
    scale = model.config.scaling_factor
    print("\n".join(precision_table(model, x, codes, args.repeats)))
    variants = {
        "full fp16 autocast": model.tokenize(x, autocast_dtype=torch.float16)[0],
        "full bf16 autocast": model.tokenize(x, autocast_dtype=torch.bfloat16)[0],
        "input rounded to bf16 only": model.tokenize(x.bfloat16().float())[0],
        "down blocks in bf16 only": model.quantize.codes(down_blocks_bf16(model, x)),
        "float16 latents re-quantized": model.quantize.codes((h * scale).half().float() / scale),
    }
    print(f"{args.model}: {len(x)} held-out crops, {codes.numel()} code positions, "
          f"held-out PSNR {evaluate_heldout(model, x):.2f} dB")
    for name, other in variants.items():
        print(f"{name}: {100 * (other == codes).float().mean().item():.2f}% of codes agree with fp32")
    z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    nearest = torch.cdist(z, model.quantize.embedding.weight).topk(2, largest=False).values
    margin = (nearest[:, 1] - nearest[:, 0]) / z.norm(dim=1)
    quantiles = {q: margin.quantile(q).item() for q in (0.01, 0.05, 0.5)}
    print("cell-boundary margin / |h|: " + ", ".join(f"q{int(q * 100)} {100 * v:.2f}%" for q, v in quantiles.items()))


if __name__ == "__main__":
    main()
