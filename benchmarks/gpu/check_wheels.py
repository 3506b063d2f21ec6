"""Static check, here, that the carried wheels plus the GPU image's packages satisfy what
tuili needs: every wheel's Requires-Dist (extras and markers false on Linux CPython 3.12
left out) must be met by another carried wheel or by a package the image holds
(IMAGE_HAS, from /work/.library/device/KINDS.md, 2026-11-17). Also: one version per
package, every wheel fits CPython 3.12 on manylinux x86_64, and the total size.
Run by fetch_wheels.sh; exits 1 on a problem."""
from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename

IMAGE_HAS = set(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler cython einops execnet filelock
fonttools fsspec h11 h5py hf-xet httpcore httpx huggingface-hub idna iniconfig jinja2 joblib kiwisolver
markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy
nvidia-ml-py packaging pandas pillow pip pluggy prometheus-client propcache protobuf psutil pygments pyparsing
pytest pytest-timeout pytest-xdist python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece
setuptools shellingham six sympy tokenizers torch tqdm transformers triton typer typing-extensions urllib3 uvloop
wheel zipp""".split())
# what tuili imports at run time (pyproject dependencies and the dev extra), by distribution
NEEDED = ["torch", "numpy", "transformers", "tokenizers", "safetensors", "gguf", "sentencepiece", "tqdm", "jinja2",
          "fastapi", "uvicorn", "pydantic", "prometheus-client", "httpx", "matplotlib", "ninja", "pytest",
          "pytest-timeout", "openai", "accelerate", "setuptools"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
OK_TAGS = {str(t) for spec in ("cp312-cp312-manylinux_2_17_x86_64", "cp312-abi3-manylinux_2_17_x86_64",
                               "py3-none-any", "py2.py3-none-any", "cp312-none-any")
           for t in parse_tag(spec)}


def main(folder: str) -> int:
    wheels = sorted(Path(folder).glob("*.whl"))
    carried: dict[str, str] = {}
    problems = []
    for w in wheels:
        name, version, _, tags = parse_wheel_filename(w.name)
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name]} and {version}")
        carried[name] = str(version)
        fits = any(str(t) in OK_TAGS or (t.interpreter in ("cp312", "py3") and t.abi in ("cp312", "abi3", "none")
                   and re.fullmatch(r"manylinux(2014|_2_(1[0-9]|2[0-8]))_x86_64|any", t.platform)) for t in tags)
        if not fits:
            problems.append(f"{w.name}: not for CPython 3.12 manylinux x86_64")
    for w in wheels:
        name = parse_wheel_filename(w.name)[0]
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = Parser().parsestr(z.read(meta).decode())
        for line in msg.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(ENV):
                continue
            dep = canonicalize_name(req.name)
            if dep in carried:
                if not req.specifier.contains(carried[dep], prereleases=True):
                    problems.append(f"{name} wants {req}, carried {dep} {carried[dep]}")
            elif dep not in IMAGE_HAS:
                problems.append(f"{name} needs {dep}: neither carried nor on the image")
    for dep in NEEDED:
        if canonicalize_name(dep) not in carried and canonicalize_name(dep) not in IMAGE_HAS:
            problems.append(f"tuili needs {dep}: neither carried nor on the image")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; checked against the image: every Requires-Dist and {len(NEEDED)} needs of tuili")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/gpu/carry/wheels"))
