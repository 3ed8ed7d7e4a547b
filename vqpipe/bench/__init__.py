"""``vqpipe bench CONFIG``: how fast one worker runs on this machine, and what holds it back.

With the config's model, resolution and batch size, on the device a worker would use:

* model ceiling: the worker's encoder (codes + latents; on a CPU in cache-sized passes on
  single-threaded streams) on tensors already on the device, at the configured precision/compile,
  plus plain ``VQModel.tokenize`` fp32 eager on the whole batch for reference, and the FLOPs;
* decode ceiling: image preprocessing (JPEG decode, resize, crop) per CPU core, single thread,
  and the same through the Pillow path only (``preprocess(fast=False)``), the figure before the
  JPEG fast path;
* pipeline: ``process_shard`` over N samples (a scratch shard built from the input's first
  shards) into a scratch folder, model loaded and compiled beforehand;

then efficiency = pipeline / min(model, decode x decode threads) and the bottleneck. Prints a
table; ``--json OUT`` appends one line per run, so OUT is a history in which regressions show.
"""
