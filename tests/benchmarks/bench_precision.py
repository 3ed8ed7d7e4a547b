"""Where reduced precision moves a tokenizer's codes, on the demo's held-out crops. Not a test; run:

    python tests/benchmarks/bench_precision.py [--model vqpipe/assets/demo-vq]

Prints, against the fp32 codes: agreement under full bf16 autocast; with only the input image
rounded to bf16 (everything else fp32); with only the encoder's down blocks under bf16 (mid block,
output convolutions and ``quant_conv`` in fp32); and after storing ``h * scaling_factor`` as float16
and re-quantizing (what the decode job's consistency check does). Also how close encoder outputs
sit to a cell boundary: (second-nearest - nearest codeword distance) / |h|, as quantiles.
Slow on CPUs without AVX512-BF16/AMX (bf16 convolutions take a ~30x slower path).
"""

from __future__ import annotations

import argparse

import torch

from vqpipe import VQModel
from vqpipe.demo.train_tokenizer import evaluate_heldout, heldout_crops


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
    args = parser.parse_args()
    model = VQModel.from_pretrained(args.model).eval()
    x = heldout_crops()
    h = model.quant_conv(model.encoder(x))
    codes = model.quantize.codes(h)
    scale = model.config.scaling_factor
    variants = {
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
