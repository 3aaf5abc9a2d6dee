"""What the near-duplicate rule catches and what it drops by mistake, on real data (CPU, about a minute).

    python benchmarks/near_duplicates.py --data ../shared/data/cifar10 --images 2000

Catches: each of ``--images`` test images altered the ways a re-saved copy is (JPEG q90, q75; resized
by 2 px up and down; shifted by 1 and 2 px; brightness +10%) must match its original. False drops:
``--images`` training images of the same data (a clean pool: other pictures) checked against the
whole test split, as retrieval checks its pool; some of those are true near-duplicates (CIFAR-10
is known to hold a few hundred between its splits; Fashion-MNIST many look-alike product photos), so
the count is an upper bound. Prints JSON and a one-line summary, for each threshold (the detail
test, ``DETAIL``, fixed).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from diffinv.data.near_duplicates import DETAIL, THRESHOLD, best_match, signatures
from diffinv.data.real import load_uint8, open_images


def altered(img: Image.Image, how: str) -> Image.Image:
    w, h = img.size
    if how.startswith("jpeg"):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(how[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if how.startswith("resize"):
        d = int(how[6:])
        return img.resize((w + d, h + d), Image.BICUBIC)
    if how.startswith("shift"):
        d = int(how[5:])
        arr = np.asarray(img)
        arr = np.pad(arr, ((0, 0), (d, 0), (0, 0)), mode="edge")[:, :w]
        return Image.fromarray(arr)
    if how == "bright":
        return Image.fromarray(np.clip(np.asarray(img).astype(np.float32) * 1.1, 0, 255).astype(np.uint8))
    raise ValueError(how)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--thresholds", default=",".join(str(t) for t in sorted({0.9, 0.93, 0.95, THRESHOLD})))
    args = ap.parse_args()
    started = time.time()
    test = open_images(args.data, "auto", args.test_split)
    train = open_images(args.data, "auto", "train")
    rs = np.random.RandomState(0)
    pick = sorted(rs.choice(len(test), min(args.images, len(test)), replace=False).tolist())
    test_sig = signatures(load_uint8(test, args.resolution))
    hows = ["jpeg90", "jpeg75", "resize2", "resize-2", "shift1", "shift2", "bright"]
    caught = {}
    for how in hows:
        imgs = [altered(test.image(i).convert("RGB"), how).resize((args.resolution,) * 2, Image.BICUBIC) for i in pick]
        sig = signatures(torch.from_numpy(np.stack([np.asarray(m) for m in imgs])).permute(0, 3, 1, 2))
        caught[how] = best_match(sig, test_sig)[0]
    clean_pick = sorted(rs.choice(len(train), min(args.images, len(train)), replace=False).tolist())
    clean = best_match(signatures(load_uint8(train.subset(clean_pick), args.resolution)), test_sig)[0]
    rows = []
    for t in [float(x) for x in args.thresholds.split(",")]:
        rows.append({"threshold": t, **{f"caught_{h}": round(float((caught[h] >= t).float().mean()), 4) for h in hows},
                     "false_drops_clean_pool": round(float((clean >= t).float().mean()), 4)})
    print(json.dumps({"benchmark": "near_duplicates", "data": args.data, "detail": DETAIL, "images": len(pick),
                      "test_split_size": len(test), "seconds": round(time.time() - started, 1), "rows": rows}))
    for r in rows:
        worst = min(v for k, v in r.items() if k.startswith("caught_"))
        print(f"near_duplicates {args.data} @ {r['threshold']}: catches >= {worst:.1%} of altered copies (worst: "
              f"{min((k for k in r if k.startswith('caught_')), key=r.get)[7:]}), drops {r['false_drops_clean_pool']:.2%} of a "
              f"clean pool of training images against {len(test):,} test images")


if __name__ == "__main__":
    main()
