"""How the engine's KV cache is named and tiered: the prefix-hash salt and the tier wiring.

Prefix hashes are salted with a digest of the weights (not the model's display name,
which differs between a path and a known name), its shape, dtype, KV dtype, quantization
and block size; the disk tier's directory is named by the same salt plus the KV layout,
so blocks left by a run with other settings are never used.
"""
from __future__ import annotations

import hashlib

import torch

from ..config import EngineConfig, parse_size
from .disk_tier import DiskTier
from .kv_cache import BlockManager
from .runner import ModelRunner
from .tiers import KVTiers


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of the weights: names, shapes, dtypes and a strided sample of each."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        t = weights[name]
        flat = t.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 256, 1)][:256].contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def prefix_salt(weights: dict[str, torch.Tensor], dtype: torch.dtype, kv_dtype: torch.dtype,
                quantization: str, model_config) -> bytes:
    return f"{weights_digest(weights)}|{dtype}|kv={kv_dtype}|q={quantization}|{model_config}".encode()


def build_tiers(cfg: EngineConfig, runner: ModelRunner, blocks: BlockManager) -> KVTiers | None:
    """The host and disk tiers behind the pool, plugged into the block manager; None when off."""
    disk = None
    if cfg.kv_disk_dir:
        fingerprint = hashlib.blake2b(blocks.root_hash + runner.kv_layout().encode(), digest_size=16).digest()
        disk = DiskTier(cfg.kv_disk_dir, parse_size(cfg.kv_disk_size), fingerprint, runner.block_nbytes)
    tiers = KVTiers(runner.read_blocks, runner.write_blocks, runner.block_nbytes, parse_size(cfg.kv_host_memory), disk)
    if not tiers.enabled:
        return None
    blocks.tiers = tiers
    blocks.on_evict = tiers.on_evict
    return tiers


def save_and_close(tiers: KVTiers, blocks: BlockManager) -> None:
    """Hand every cached block to the tiers (least recently used first) and wait for writes."""
    in_use = [b for b in range(blocks.num_blocks) if blocks.ref_counts[b] > 0]
    order = list(blocks.free_queue) + in_use
    tiers.close([(b, blocks.block_hash[b]) for b in order if blocks.block_hash[b] is not None])
    blocks.tiers, blocks.on_evict = None, None
