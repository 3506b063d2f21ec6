"""The bf16 product path chosen per row count by measurement (model/paths.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tuili.model import paths
from tuili.model.kernels import cpu_kernels
from tuili.model.packed import pack_weight

needs_gemm = pytest.mark.skipif(cpu_kernels() is None or not cpu_kernels().gemm_available(),
                                reason="the CPU kernels' products are not available here")


def test_crossover_is_the_last_row_count_before_the_first_loss():
    assert paths.crossover([(1, 1.0, 2.0), (8, 2.0, 3.0), (16, 5.0, 4.0), (32, 1.0, 9.0)]) == 8
    assert paths.crossover([(1, 3.0, 2.0), (8, 1.0, 3.0)]) == 0
    assert paths.crossover([(1, 1.02, 1.0), (8, 1.1, 1.0)]) == 1  # within 3%: a tie, kept packed
    assert paths.crossover([(1, 1.0, 2.0), (2048, 1.0, 1.0)]) == paths.NEVER


def test_widening_starts_where_it_wins_at_every_larger_row_count():
    # (rows, vdpbf16ps ms, widened ms)
    assert paths.widen_from([(1, 1.0, 1.1), (8, 2.0, 1.5), (64, 9.0, 6.0)]) == 8
    assert paths.widen_from([(1, 1.0, 0.9), (8, 2.0, 2.5), (64, 9.0, 6.0)]) == 64  # a loss at 8 ends it there
    assert paths.widen_from([(1, 1.0, 1.02), (8, 2.0, 1.5)]) == 1  # within 3%: a tie, widened
    assert paths.widen_from([(1, 1.0, 0.5), (64, 9.0, 9.5)]) == paths.NEVER  # lost at the largest


def test_env_fixes_the_widening(monkeypatch):
    monkeypatch.delenv("TUILI_PACKED_MAX_ROWS", raising=False)
    monkeypatch.setenv("TUILI_BF16_WIDEN_ROWS", "16")
    choice = paths.bf16_paths([(64, 32)])
    assert (choice.widen_min_rows, choice.packed_max_rows, choice.source) == (16, paths.PACKED_MAX_ROWS, "env")
    assert choice.path_for(8) == "packed" and choice.path_for(9) == "torch"  # widening starts above the packed range
    monkeypatch.setenv("TUILI_PACKED_MAX_ROWS", "64")
    choice = paths.bf16_paths([(64, 32)])
    assert choice.path_for(16) == "packed (widened)" and choice.path_for(65) == "torch"
    if cpu_kernels() is not None and cpu_kernels().gemm_available():
        assert cpu_kernels().bf16_widen_rows() == 16  # handed to the kernels
    monkeypatch.setenv("TUILI_BF16_WIDEN_ROWS", "0")
    assert paths.bf16_paths([(64, 32)]).widen_min_rows == paths.NEVER
    if cpu_kernels() is not None and cpu_kernels().gemm_available():
        assert cpu_kernels().bf16_widen_rows() == paths.NEVER


def test_env_fixes_the_crossover(monkeypatch):
    monkeypatch.delenv("TUILI_BF16_WIDEN_ROWS", raising=False)
    monkeypatch.setenv("TUILI_PACKED_MAX_ROWS", "24")
    choice = paths.bf16_paths([(64, 32)])
    assert (choice.packed_max_rows, choice.source) == (24, "env")
    assert choice.path_for(24) == "packed" and choice.path_for(25) == "torch"
    monkeypatch.setenv("TUILI_PACKED_MAX_ROWS", "lots")
    with pytest.raises(ValueError, match="TUILI_PACKED_MAX_ROWS"):
        paths.bf16_paths([(64, 32)])


@needs_gemm
def test_measured_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.delenv("TUILI_PACKED_MAX_ROWS", raising=False)
    monkeypatch.delenv("TUILI_BF16_WIDEN_ROWS", raising=False)
    monkeypatch.setattr(paths, "_cache_file", lambda: tmp_path / "paths.json")
    monkeypatch.setattr(paths, "_choices", {})
    monkeypatch.setattr(paths, "ROW_GRID", (1, 4, 16))
    monkeypatch.setattr(paths, "plausible", lambda timings: True)  # judged in the test below
    first = paths.bf16_paths([(48, 32), (32, 64)])
    assert first.source == "measured"
    assert [t[0] for t in first.timings] == [1, 4, 16]
    assert first.packed_max_rows == paths.crossover(first.timings)
    stored = json.loads((tmp_path / "paths.json").read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["packed_max_rows"] == first.packed_max_rows
    monkeypatch.setattr(paths, "_choices", {})  # a new process: read from the file, not timed again
    monkeypatch.setattr(paths, "measure", lambda *a, **k: pytest.fail("timed again despite the cache"))
    again = paths.bf16_paths([(32, 64), (48, 32)])
    assert again.source == "cached" and again.packed_max_rows == first.packed_max_rows
    if paths._widen_applies(cpu_kernels()):  # vdpbf16ps against widening timed too, and kept
        assert [t[0] for t in first.widen_timings] == [1, 4, 16]
        assert first.widen_min_rows == paths.widen_from(first.widen_timings)
        assert (again.widen_min_rows, again.widen_timings) == (first.widen_min_rows, first.widen_timings)
    else:
        assert first.widen_min_rows == paths.NEVER and not first.widen_timings
    assert cpu_kernels().bf16_widen_rows() == again.widen_min_rows


@needs_gemm
def test_packed_weight_takes_torch_above_its_max_rows():
    torch.manual_seed(0)
    w = torch.randn(40, 64).bfloat16()
    pw = pack_weight(w, 4)
    assert pw.max_rows == 4 and pw.dense.numel() == w.numel()
    small, large = torch.randn(4, 64).bfloat16(), torch.randn(5, 64).bfloat16()
    packed_only = pack_weight(w, None)
    assert packed_only.dense.numel() == 0
    assert torch.equal(pw.matmul(small), packed_only.matmul(small))  # packed kernel
    assert torch.equal(pw.matmul(large), F.linear(large, w))  # torch's matmul on the plain copy
    torch.testing.assert_close(packed_only.matmul(large).float(), F.linear(large, w).float(), rtol=2e-2, atol=2e-2)


def test_timings_that_do_not_grow_with_rows_are_not_trusted(monkeypatch, tmp_path):
    monkeypatch.delenv("TUILI_BF16_WIDEN_ROWS", raising=False)
    busy = [(1, 80.0, 79.0), (16, 81.0, 80.0), (64, 79.0, 82.0)]
    quiet = [(1, 0.26, 0.47), (64, 3.0, 3.4), (512, 24.7, 22.5)]
    assert not paths.plausible(busy) and paths.plausible(quiet)
    assert not paths.plausible([(1, 0.2, 0.2), (8, 1.0, 1.0)])  # too few rows timed to judge
    if cpu_kernels() is None or not cpu_kernels().gemm_available():
        return
    monkeypatch.delenv("TUILI_PACKED_MAX_ROWS", raising=False)
    monkeypatch.setattr(paths, "_cache_file", lambda: tmp_path / "paths.json")
    monkeypatch.setattr(paths, "_choices", {})
    monkeypatch.setattr(paths, "measure", lambda *a, **k: busy)
    monkeypatch.setattr(paths, "measure_widen", lambda *a, **k: busy)
    choice = paths.bf16_paths([(64, 32)])
    assert choice.packed_max_rows == paths._fallback(cpu_kernels()) and choice.source.startswith("default")
    assert choice.widen_min_rows == paths.NEVER and cpu_kernels().bf16_widen_rows() == paths.NEVER
    assert not (tmp_path / "paths.json").exists()  # measured again at the next start


@pytest.fixture
def int8_env(monkeypatch, tmp_path):
    """A fresh cache and memo for int8_paths, and the kernels' int8 setting put back after."""
    monkeypatch.delenv("TUILI_INT8_AMX_ROWS", raising=False)
    monkeypatch.setattr(paths, "_cache_file", lambda: tmp_path / "paths.json")
    monkeypatch.setattr(paths, "_choices", {})
    ext = cpu_kernels()
    before = ext.int8_amx_rows() if ext is not None and ext.gemm_available() else None
    yield tmp_path / "paths.json"
    if before is not None:
        ext.set_int8_amx_rows(before)


needs_amx_int8 = pytest.mark.skipif(cpu_kernels() is None or not cpu_kernels().gemm_amx_int8_available(),
                                    reason="no AMX int8 tiles on this CPU")


def test_int8_choice_without_amx_is_the_vnni_tiles(int8_env, monkeypatch):
    ext = cpu_kernels()
    if ext is not None and ext.gemm_available() and ext.gemm_amx_int8_available():
        monkeypatch.setenv("TUILI_AMX", "0")  # the switch turns the choice off as it turns the tiles off
    choice = paths.int8_paths([(64, 32)])
    assert choice.amx_min_rows == paths.NEVER and choice.source == "no AMX"
    assert choice.path_for(4096) == "packed" and "VNNI" in choice.describe()
    assert not int8_env.exists()


@needs_amx_int8
def test_int8_env_fixes_the_amx_rows(int8_env, monkeypatch):
    monkeypatch.setenv("TUILI_INT8_AMX_ROWS", "24")
    choice = paths.int8_paths([(64, 32)])
    assert (choice.amx_min_rows, choice.source) == (24, "env") and cpu_kernels().int8_amx_rows() == 24
    assert choice.path_for(23) == "packed" and choice.path_for(24) == "packed (AMX)"
    monkeypatch.setenv("TUILI_INT8_AMX_ROWS", "0")
    assert paths.int8_paths([(64, 32)]).amx_min_rows == paths.NEVER
    assert cpu_kernels().int8_amx_rows() == paths.NEVER
    monkeypatch.setenv("TUILI_INT8_AMX_ROWS", "x")
    with pytest.raises(ValueError, match="TUILI_INT8_AMX_ROWS"):
        paths.int8_paths([(64, 32)])
    assert not int8_env.exists()  # nothing timed, nothing cached


@needs_amx_int8
def test_int8_amx_rows_measured_once_then_cached(int8_env, monkeypatch):
    monkeypatch.setattr(paths, "ROW_GRID", (1, 4, 16))
    monkeypatch.setattr(paths, "plausible", lambda timings: True)
    first = paths.int8_paths([(48, 64), (32, 64)])
    assert first.source == "measured" and [t[0] for t in first.timings] == [1, 4, 16]
    assert first.amx_min_rows == paths.widen_from(first.timings)
    assert cpu_kernels().int8_amx_rows() == first.amx_min_rows
    monkeypatch.setattr(paths, "_choices", {})  # a new process: from the file
    monkeypatch.setattr(paths, "measure_int8_amx", lambda *a, **k: pytest.fail("timed again despite the cache"))
    again = paths.int8_paths([(32, 64), (48, 64)])
    assert (again.source, again.amx_min_rows, again.timings) == ("cached", first.amx_min_rows, first.timings)


@needs_amx_int8
def test_int8_busy_timings_keep_the_fixed_rule(int8_env, monkeypatch):
    busy = [(1, 80.0, 79.0), (16, 81.0, 80.0), (64, 79.0, 82.0)]
    monkeypatch.setattr(paths, "measure_int8_amx", lambda *a, **k: busy)
    choice = paths.int8_paths([(64, 32)])
    assert choice.amx_min_rows == paths.INT8_AMX_ROWS and choice.source.startswith("default")
    assert cpu_kernels().int8_amx_rows() == paths.INT8_AMX_ROWS and not int8_env.exists()
