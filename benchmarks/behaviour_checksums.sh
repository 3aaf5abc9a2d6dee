#!/usr/bin/env bash
# Checksums of a fixed tiny pipeline: invert (per image, per class, with early stopping; a pixel and a
# v-prediction model), generate (di, img2img, class-inversion, ddim-inversion, lora; ddim, dpm++2m and
# pndm samplers), LoRA fitting, a short base pretraining, train. Run it before and after a refactor:
# equal lines mean equal embeddings, PNG bytes, weights and metrics.
#   bash benchmarks/behaviour_checksums.sh [WORKDIR]
set -euo pipefail
W=${1:-$(mktemp -d)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$W" && mkdir -p "$W"
exec 3>&1 1>&2  # the stages' messages to stderr; only the checksums (JSON) to stdout
python - "$W" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from diffinv.diffusion.tiny import save_tiny_model
w = Path(sys.argv[1])
save_tiny_model(w / "model", "latent")
save_tiny_model(w / "pixel", "pixel")
save_tiny_model(w / "vpred", "latent", prediction_type="v_prediction")
rs = np.random.RandomState(0)
for split, n in (("train", 4), ("test", 3)):
    for c in ("cat", "dog", "owl"):
        (w / "images" / split / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rs.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(w / "images" / split / c / f"{i:03d}.png")
EOF
q="--quiet"
diffinv invert --model "$W/model" --data "$W/images" --resolution 16 --steps 12 --batch-size 5 --out "$W/store" $q
diffinv invert --model "$W/model" --data "$W/images" --resolution 16 --steps 12 --target class --out "$W/class" $q
diffinv invert --model "$W/model" --data "$W/images" --resolution 16 --steps 40 --lr 0.03 --lr-schedule constant \
  --early-stop 0.002 --check-every 3 --batch-size 4 --out "$W/early" $q
diffinv generate --store "$W/store" --per-image 2 --steps 3 --out "$W/di" $q
diffinv generate --store "$W/store" --method img2img --strength 0.6 --per-image 2 --steps 3 --out "$W/img2img" $q
diffinv generate --store "$W/class" --method class-inversion --per-image 2 --steps 3 --out "$W/classinv" $q
diffinv invert --model "$W/pixel" --data "$W/images" --steps 8 --out "$W/pixel-store" $q
diffinv generate --store "$W/pixel-store" --sampler dpm++2m --per-image 1 --steps 3 --out "$W/pixel-di" $q
diffinv invert --model "$W/vpred" --data "$W/images" --resolution 16 --steps 8 --out "$W/vpred-store" $q
diffinv generate --store "$W/vpred-store" --sampler pndm --per-image 1 --steps 3 --out "$W/vpred-di" $q
diffinv generate --store "$W/store" --method ddim-inversion --per-image 1 --steps 3 --out "$W/ddiminv" $q
diffinv finetune --store "$W/class" --steps 4 --batch-size 2 --out "$W/lora" $q
diffinv generate --store "$W/class" --method lora --adapters "$W/lora" --per-image 1 --steps 3 --out "$W/lora-di" $q
diffinv pretrain-base --data "$W/images" --resolution 16 --channels 16,32 --cross-attention-dim 16 --steps 6 --batch-size 4 \
  --warmup 2 --out "$W/base" $q
diffinv train --data "$W/images" --synthetic "$W/di" --arch shufflenetv2 --resolution 16 --steps 30 --batch-size 8 \
  --eval-every 10 --out "$W/train" $q
{ python - "$W" <<'EOF'
import hashlib, json, sys
from pathlib import Path
from safetensors.torch import load_file
w = Path(sys.argv[1])
def digest(parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]
out = {}
for store in ("store", "class", "early", "pixel-store", "vpred-store"):
    parts = sorted((w / store / "parts").glob("*.safetensors"))
    out[f"invert {store}: embeddings"] = digest(t.numpy().tobytes() for p in parts for _, t in sorted(load_file(p).items()))
    rows = [json.loads(l) for l in (w / store / "manifest.jsonl").read_text().splitlines()] if (w / store / "manifest.jsonl").exists() else []
    if rows:
        out[f"invert {store}: steps"] = sum(r.get("steps", 0) for r in rows)
for s in ("di", "img2img", "classinv", "pixel-di", "vpred-di", "ddiminv", "lora-di"):
    pngs = sorted((w / s).rglob("*.png"))
    out[f"generate {s}: {len(pngs)} PNGs"] = digest(p.read_bytes() for p in pngs)
out["finetune: adapters"] = digest(t.numpy().tobytes() for p in sorted((w / "lora").rglob("*.safetensors"))
                                   for _, t in sorted(load_file(p).items()))
out["pretrain-base: unet"] = digest(t.numpy().tobytes() for p in sorted((w / "base" / "unet").glob("*.safetensors"))
                                    for _, t in sorted(load_file(p).items()))
final = json.loads((w / "train" / "final.json").read_text())
out["train: weights"] = digest(t.numpy().tobytes() for _, t in sorted(load_file(w / "train" / "model.safetensors").items()))
out["train: metrics"] = {k: final[k] for k in sorted(final) if isinstance(final[k], float)}
print(json.dumps(out, indent=1))
EOF
} 1>&3
