#!/usr/bin/env bash
# Fault sweep: bad inputs, kills, hostile files, two writers. Prints one row per scenario:
# scenario <TAB> exit code <TAB> the last line printed. None may end in a silent wrong result.
# Usage: benchmarks/fault_sweep.sh [WORKDIR]   (about 3 minutes on 2 CPU cores; needs numpy, Pillow)
export OMP_NUM_THREADS=1 DIFFINV_LOG_FORMAT=lines
D=${DIFFINV:-diffinv}
PY=${PYTHON:-python}
S=$(realpath -m "${1:-fault-sweep}"); rm -rf "$S"; mkdir -p "$S"; cd "$S"
$PY - <<'P'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for root, n in (("data", 3), ("split/train", 30), ("split/test", 5)):
    for c, cls in enumerate(("cat", "dog")):
        (Path(root) / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) // (c + 1)).save(f"{root}/{cls}/{i:03d}.png")
P
$D tiny-model --out tiny >/dev/null
$D invert --model tiny --data data --resolution 16 --steps 3 --out store >/dev/null 2>&1
$D generate --store store --per-image 2 --steps 3 --out set >/dev/null 2>&1
row() { local name="$1"; shift; local out; out=$("$@" 2>&1); local rc=$?; printf '%s\t%s\t%s\n' "$name" "$rc" "$(echo "$out" | grep -v '^\s*$' | tail -n 1 | cut -c1-260)"; }
# 1 unfinished set
cp -r set set-unf; sed -i 's/"complete"/"in-progress"/' set-unf/generate.json
row "export of an unfinished set" $D export --set set-unf --out e1
row "export --out = --set" $D export --set set --out set
row "export --shard-size 0" $D export --set set --to webdataset --shard-size 0 --out e3
$D export --set set --to webdataset --out e4 >/dev/null 2>&1
row "export again, other format, same --out" $D export --set set --to imagefolder --out e4
row "export --push-to-hub without --to hf" $D export --set set --push-to-hub me/x --out e5
# 6 truncated VAE weights
cp -r tiny tiny-trunc; f=$(ls tiny-trunc/vae/*.safetensors); head -c 1000 $f > $f.x && mv $f.x $f
row "invert with truncated VAE weights" $D invert --model tiny-trunc --data data --resolution 16 --steps 2 --out st6
# 7 YAML with python tag
printf 'data: !!python/object/apply:os.system ["echo pwned"]\n' > evil.yaml
row "study YAML with a !!python tag" $D experiment evil.yaml --out st7
# 8 two writers
( $D invert --model tiny --data split/train --resolution 16 --steps 200 --out st8 >/dev/null 2>&1 & ); sleep 6
row "second invert into the same --out while the first runs" $D invert --model tiny --data split/train --resolution 16 --steps 200 --out st8
pkill -f "out st8"; sleep 1
# 9 empty data folder
mkdir empty
row "invert on an empty data folder" $D invert --model tiny --data empty --resolution 16 --steps 2 --out st9
# 10 one class
mkdir -p one/cat && cp data/cat/* one/cat/
row "train on data with one class" $D train --data one --steps 2 --out t10
# 11 manifest edited: one row's class flipped
cp -r set set-edit; python3 - <<'P'
import json; p='set-edit/manifest.jsonl'; rows=[json.loads(l) for l in open(p)]
rows[0]['class']='dog'; rows[0]['label']=1
open(p,'w').write(''.join(json.dumps(r,sort_keys=True)+'\n' for r in rows))
P
row "verify a set whose manifest relabels an image" $D verify set-edit
row "train --synthetic on that set" $D train --data split --synthetic set-edit --steps 2 --arch small-cnn --out t11
# 12 --out is a regular file
echo x > afile
row "--out is an existing file" $D invert --model tiny --data data --resolution 16 --steps 2 --out afile
# 13 study file is a directory
row "study file is a folder" $D experiment data --out st13
# 14 wrong-arch safetensors
$PY -c "
import torch; from safetensors.torch import save_file; save_file({'w': torch.zeros(3,3)}, 'wrong.safetensors')"
row "--pretrained with another architecture's weights" $D train --data split --pretrained wrong.safetensors --steps 2 --out t14
# 15 generate --store a set
row "generate --store given a set" $D generate --store set --out g15
# 16 train --synthetic a store
row "train --synthetic given a store" $D train --data split --synthetic store --steps 2 --out t16
# 17 a truncated PNG in the data
cp -r data data-bad; f=$(ls data-bad/cat/* | head -1); head -c 40 $f > $f.x && mv $f.x $f
row "invert with one truncated PNG (default --bad-images)" $D invert --model tiny --data data-bad --resolution 16 --steps 2 --out st17
# 18 npz labels shorter than images
$PY -c "
import numpy as np; np.savez('bad.npz', train_images=np.zeros((10,8,8,3),np.uint8), train_labels=np.zeros(7,np.int64))"
row "npz whose labels are shorter than its images" $D invert --model tiny --data bad.npz --resolution 16 --steps 2 --out st18
# 19 csv naming missing files
printf 'path,label\nnope1.png,a\nnope2.png,b\n' > list.csv
row "CSV naming files that do not exist" $D invert --model tiny --data list.csv --resolution 16 --steps 2 --out st19
row "--per-class 0" $D invert --model tiny --data data --per-class 0 --resolution 16 --steps 2 --out st20
# 21 kill -9 export then re-run
$D export --set set --to webdataset --shard-size 3 --out e21ref >/dev/null 2>&1
( $D export --set set --to webdataset --shard-size 3 --out e21 >/dev/null 2>&1 & ); sleep 2.5; pkill -9 -f "out e21$"; sleep 1
$D export --set set --to webdataset --shard-size 3 --out e21 --resume >/dev/null 2>&1
row "export killed with -9 then --resume: same shards as an unkilled one" bash -c "cmp <(cat e21ref/shard-*.tar) <(cat e21/shard-*.tar) && echo identical"
# 22 store part deleted then generate
cp -r store store-dmg; rm store-dmg/parts/part-*.safetensors
row "generate from a store with its tensors deleted" $D generate --store store-dmg --per-image 1 --steps 2 --out g22
# 23 NaN in an embedding
cp -r store store-nan; $PY - <<'P'
import glob; from safetensors.torch import load_file, save_file
p=glob.glob('store-nan/parts/part-*.safetensors')[0]; t=load_file(p); t['embeddings'][0,0,0]=float('nan'); save_file(t,p)
P
row "generate from a store with a NaN embedding (checksum not updated)" $D generate --store store-nan --per-image 1 --steps 2 --out g23
# 24 duplicate keys in a study YAML
printf 'data: split\ndata: digits\nper_class: [2]\n' > dup.yaml
row "study YAML with a key written twice" $D experiment dup.yaml --plan --out st24
row "--config with an unknown key" bash -c "printf 'stepz: 3\n' > c.yaml; $D invert --config c.yaml --model tiny --data data --out st25"
row "experiment --plan with a model path that does not exist" $D experiment --data split --model nope-model --fast --plan --out st26
row "export a store instead of a set" $D export --set store --out e27
row "export --with-real, generate.json naming a deleted data folder (the store records the data)" bash -c "cp -r set set-moved; sed -i 's#\"data\": \"[^\"]*\"#\"data\": \"/nonexistent\"#' set-moved/generate.json; rm -rf store-x; $D export --set set-moved --with-real --out e28 2>&1"
