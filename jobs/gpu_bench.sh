#!/usr/bin/env bash
# One-GPU benchmark of vqpipe (issue 6): `vqpipe bench` for the demo tokenizer (configs/demo.yaml,
# precision/compile auto = fp16 + torch.compile on CUDA) and for an LDM-f4-sized VQ model
# (block_out_channels 128-256-512, 2 layers per block, 8192 codes, random init) at 256x256, bf16 +
# compile, batch 128 and 256; then the pipeline without the model's cost (--null-model) with each JPEG
# decoder, preprocess.decoder cpu and gpu (nvJPEG: needs torchvision, else that bench fails and is
# logged). Needs only this repository and wheels: no network, no Ray cluster.
#
#   bash jobs/gpu_bench.sh [DEST]      # DEST: results folder (default $OUT, else ./bench-out)
#   WHEELS=/path/to/wheels bash jobs/gpu_bench.sh   # install offline from a wheel folder
#
# Writes DEST/gpu_bench.jsonl (one JSON line per bench run, appended: a history) and DEST/*.log
# (the tables). A CUDA torch already on the machine is reused (the venv sees system packages).
# Budget: under 10 minutes on an H100/H200-class GPU; each bench has its own timeout, and a bench
# that fails or times out is logged and the next one still runs. The fp32-eager reference of the
# LDM model at batch 256 needs ~40 GB of GPU memory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$(mkdir -p "${1:-${OUT:-$PWD/bench-out}}" && cd "${1:-${OUT:-$PWD/bench-out}}" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vqpipe-gpu-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
HISTORY="$DEST/gpu_bench.jsonl"
SAMPLES="${SAMPLES:-2048}"
JPEG_SIZE="${JPEG_SIZE:-512x384}"  # the demo shards hold 320px photos; LAION's are larger
CORES="$(nproc)"
DECODE=$(( CORES > 3 ? CORES - 2 : 1 ))  # leave the main thread (read, upload, write) a core

cd "$REPO"
python3 -m venv --system-site-packages "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
PIP=(python -m pip install --quiet --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
"${PIP[@]}" --no-build-isolation -e . || "${PIP[@]}" -e .
python - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_bench.sh: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF

# The demo tokenizer ships in the package once trained; until then a random one of its shape.
DEMO_MODEL=demo
if [ ! -f vqpipe/assets/demo-vq/config.json ]; then DEMO_MODEL="$WORK/demo-like"; fi
python - "$WORK" <<'EOF'
import sys
from pathlib import Path

import torch

from vqpipe import VQModel

work = Path(sys.argv[1])
torch.manual_seed(0)
blocks = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
VQModel(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, vq_embed_dim=4,
        num_vq_embeddings=1024, **blocks).save_pretrained(str(work / "demo-like"))
VQModel(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
        num_vq_embeddings=8192, **blocks).save_pretrained(str(work / "ldm-f4"))
EOF

export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"  # shared by the runs: fewer kernels to rebuild
SHARDS="$REPO/vqpipe/assets/demo-shards/demo-{00000..00003}.tar"
COMMON=("input.urls=$SHARDS" "output.path=$WORK/unused" "preprocess.decode_workers=$DECODE")
FAILED=0

bench() {  # bench NAME TIMEOUT_S ARGS...
  local name="$1" limit="$2"
  shift 2
  echo "== $name (timeout ${limit}s)"
  if ! timeout "$limit" python -c 'import sys; from vqpipe.bench.cli import main; sys.exit(main(sys.argv[1:]))' \
      "$@" --jpeg-size "$JPEG_SIZE" --json "$HISTORY" 2>&1 | tee "$DEST/$name.log"; then
    echo "gpu_bench.sh: $name failed or timed out" | tee -a "$DEST/$name.log"
    FAILED=1
  fi
}

bench demo 90 configs/demo.yaml "model.path=$DEMO_MODEL" "${COMMON[@]}" --samples "$SAMPLES"
for batch in 128 256; do
  bench "ldm-f4-b$batch" 140 configs/demo.yaml "model.path=$WORK/ldm-f4" "${COMMON[@]}" \
    preprocess.resolution=256 model.precision=bf16 model.compile=true "model.batch_size=$batch" \
    --samples "$SAMPLES"
done
for decoder in cpu gpu; do
  bench "null-decoder-$decoder" 90 configs/demo.yaml "model.path=$DEMO_MODEL" "${COMMON[@]}" \
    preprocess.resolution=256 "preprocess.decoder=$decoder" --null-model --samples "$SAMPLES"
done

echo "history: $HISTORY ($(cat "$HISTORY" 2>/dev/null | wc -l) lines)"
exit "$FAILED"
