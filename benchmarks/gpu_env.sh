# Sourced by the GPU scripts: make `diffinv` importable on a bare GPU machine without internet.
# The machine's image has torch, safetensors, huggingface_hub...; diffusers (and importlib_metadata)
# travel as wheels in .whl/ (see benchmarks/README.md), installed into /tmp/site.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "diffusers is not installed and no wheels are in .whl/; pip install diffusers" >&2; exit 1
  fi
fi
python3 -c "import torch, diffusers, diffinv; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" || exit 1
