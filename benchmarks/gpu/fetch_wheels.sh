#!/usr/bin/env bash
# Download, here, the wheels that tuili needs on the GPU machine and that its image lacks
# (or may hold in too old a version), for CPython 3.12 on manylinux x86_64, into
# benchmarks/gpu/carry/wheels (ignored by git; named in the device tool's `carry`).
#
# Pins match .venv (`.venv/bin/pip freeze`) so the GPU runs what the CPU tests ran.
# Not downloaded: torch, transformers, tokenizers, safetensors, triton, nvidia-*,
# numpy, httpx, httpcore, prometheus-client, pytest, sentencepiece, jinja2, tqdm,
# pyyaml, requests, matplotlib, ninja: the GPU image has them (KINDS.md's list).
# Small pure-Python packages that the image has in an unknown version (anyio,
# typing-extensions, h11, click, idna, annotated-doc, pytest-timeout) travel too, so
# that a too-old one there cannot stop the install; pip uses the image's copy when it
# satisfies the requirement.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=benchmarks/gpu/carry/wheels
PIP=${PIP:-.venv/bin/pip}
PKGS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  opentelemetry-api==1.45.2 annotated-doc==0.0.7
  gguf==0.19.0
  openai==3.60.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  anyio==4.16.0 typing_extensions==4.16.0 h11==0.16.0 click==8.5.1 idna==3.20
  pytest-timeout==2.4.0
  setuptools==${SETUPTOOLS_VERSION:-84.2.1}
)
mkdir -p "$DEST"
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}
  have=$(ls "$DEST" | grep -i "^${name//-/_}-${spec##*==}-" || true)
  [ -n "$have" ] && continue
  "$PIP" download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --no-deps -d "$DEST" "$spec"
done
ls -la "$DEST"
du -sh "$DEST"
"${PY:-.venv/bin/python}" benchmarks/gpu/check_wheels.py "$DEST"
