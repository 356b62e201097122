#!/usr/bin/env bash
# The GPU measurements of one lent GPU, in one call of at most 8 minutes; writes
# benchmarks/results/gpu-cuda.json (and $OUT/gpu-cuda.json when $OUT is set, as on the device machine).
#
#   1. the data path alone, images/s at 224 px, batch 256: the image folder with per-image
#      transforms in 15 loader workers, and shards built by the script from 20,000 synthetic 400x350
#      JPEGs, decoded on the GPU (nvJPEG, one call a batch) with the views drawn there;
#   2. the step alone per setting (keep 1, 0.5, 0.25; patch 32; merge 0.2), ViT-S/16 224 bf16, batches
#      128 and 256: step_s, speedup, efficiency (speedup over the FLOPs ratio);
#   3. end to end, data included: the accelerated SimCLR ViT-S/16 recipe's schedule against the
#      baseline's, 150 real steps each from shards decoded and augmented on the GPU (end_to_end);
#   4. if time is left: the step of 2. at batch 256 with train.compile (reduce-overhead: CUDA
#      graphs), one compilation per setting.
#
# On the device machine (it reaches no package index): copy the pure-Python packages it lacks into
# .gpusite/ beside the repository (lightly, hydra, omegaconf, antlr4, streaming and its imports) and
# carry .gpusite; this script puts it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".gpusite:.${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python=${PYTHON:-python}

grid=1.0:16,0.5:16,0.25:16,1.0:32,1.0:16:0.2
timeout 150 "$python" -m benchmarks.data_path --device cuda --count 6000 --batch 256 --batches 15 \
  --repeats 3 --workers 15 --threads 16 -o "$out/data_path-cuda.json"
for batch in 128 256; do
  timeout 70 "$python" -m benchmarks.throughput --arch vit_small_patch16_224 --image-size 224 --patch 16 \
    --batch "$batch" --precision bf16 --grid "$grid" --rounds 5 -o "$out/throughput-b$batch-cuda.json"
done

shards=$(mktemp -d)/shards
timeout 40 "$python" - "$shards" <<'EOF'
import sys, tempfile
from pathlib import Path
from accelvit.shards import prepare, synthetic_folder

folder = synthetic_folder(Path(tempfile.mkdtemp()) / "train", 4000, (400, 350))
(folder.parent / "val").symlink_to(folder)  # a val/ split, never read (no in-loop evaluation)
print(prepare(folder.parent, Path(sys.argv[1]), 320))
EOF
timeout 120 "$python" -m benchmarks.end_to_end --recipe recipes/imagenet-simclr-vits16.yaml --steps 150 \
  --set data.dataset=shards --set "data.root=$shards" --set data.augment=device --set data.workers=8 \
  -o "$out/end_to_end-cuda.json" || true
timeout 60 "$python" -m benchmarks.throughput --arch vit_small_patch16_224 --image-size 224 --patch 16 \
  --batch 256 --precision bf16 --grid 1.0:16,0.5:16,0.25:16 --rounds 5 --warmup 3 \
  --compile reduce-overhead -o "$out/throughput-compiled-b256-cuda.json" || true

"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
data = json.loads((out / "data_path-cuda.json").read_text())
rows = []
for batch in (128, 256):
    step = json.loads((out / f"throughput-b{batch}-cuda.json").read_text())
    for r in step["rows"]:
        rows.append({**r, "batch": batch, "data_images_per_s": data["shards_images_per_s"],
                     "step_images_per_s": batch / r["step_s"]})
result = {"benchmark": "gpu", "device": data["device"], "data_path": data, "steps": rows}
for name, key in (("end_to_end-cuda.json", "end_to_end"), ("throughput-compiled-b256-cuda.json", "compiled")):
    if (out / name).is_file():  # the parts that may not finish in the time left
        result[key] = json.loads((out / name).read_text())
for path in {out / "gpu-cuda.json", Path("benchmarks/results/gpu-cuda.json")}:
    path.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: data[k] for k in ("folder_images_per_s", "shards_images_per_s")}))
EOF
