"""The disk tier: KV blocks as files in a local directory, written and read by thread pools.

Layout and decisions:
- One block is one file, `<dir>/tuili-kv-<fingerprint>/<2 hex>/<block hash hex>.kvb`, so
  one block is one read. The fingerprint names the model weights, dtype, KV dtype,
  quantization, block size and KV layout: an engine with other settings looks in another
  directory and never sees these blocks. Other fingerprints' directories are left alone,
  and each is bounded on its own.
- Every file is self-describing: a 64-byte header (magic, fingerprint, block hash,
  payload length, blake2b checksum of the payload) then the payload. A file whose size,
  header or checksum is wrong is dropped (deleted), logged in one line, and reported as
  a miss, so the caller recomputes the prefix: a wrong block is never used.
- Restart: the directory is the index. At start the files are listed (oldest access
  first, by mtime; a read refreshes the mtime), leftovers of interrupted writes are
  deleted, and files of the wrong size are dropped.
- Size bound: all files have the same size (header + payload), so the bound is a count.
  A write reserves its slot when queued; the writes that make room delete their victims
  (the least recently used files) before writing, so the bytes on disk never exceed
  `size_bytes` (the file system's own rounding to its block size is not counted). A
  block whose slot is still being written is not evicted; when every slot is, a new
  block is dropped (counted in `dropped_writes`): back-pressure from a slow disk.
- Writes never block the caller: `put` queues the buffer to a writer pool and keeps it
  in `pending` until the file is in place; a read of a pending block is served from
  that buffer. Reads are batched (`get_many`) over a separate reader pool, so reads never
  wait behind a queue of writes.
- One process per directory by default: a lock file (`flock`) is taken at start; a
  second process on the same directory and settings logs a warning and runs without the
  disk tier.
- Shared mode (`TUILI_KV_DISK_SHARED=1`, set by the engine replicas of `tuili serve
  --replicas`): several processes on one machine use one directory. Safe because a block
  file's content is a function of its name (hash + fingerprint): each file is written
  once under a temporary name unique to the process and thread, then renamed into place
  (atomic on one file system), so a reader sees a whole file or none. A block another
  process wrote is found on a miss (`__contains__` looks for the file) and adopted into
  this process's index, so a prefix computed by one replica is a disk hit for another.
  Each process bounds the files it knows (`size_bytes` per process, so the directory
  holds at most replicas x size); an eviction by one process is a miss for another (its
  read finds no file, the prefix is recomputed). Only temporary files older than an hour
  are swept at start (a younger one may be another process's write in progress).
  Several machines: each has its own directory (a network file system's rename and
  locking are not relied on).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("tuili.kv.disk")

MAGIC = b"TUILIKV1"
HEADER = struct.Struct("<8s16s16sQ16s")  # magic, fingerprint, block hash, payload bytes, checksum
SUFFIX = ".kvb"


def checksum(payload) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class _AlreadyThere(Exception):
    pass


@dataclass
class DiskStats:
    blocks_written: int = 0
    blocks_read: int = 0
    evictions: int = 0
    errors: int = 0  # corrupt, truncated or foreign files dropped
    dropped_writes: int = 0  # no room even after evicting (bound smaller than one block)


class DiskTier:
    def __init__(self, root: str | Path, size_bytes: int, fingerprint: bytes, payload_nbytes: int,
                 read_workers: int = 4, write_workers: int = 2):
        self.fingerprint = fingerprint[:16].ljust(16, b"\0")
        self.payload_nbytes = payload_nbytes
        self.file_nbytes = HEADER.size + payload_nbytes
        self.size_bytes = size_bytes
        self.capacity = size_bytes // self.file_nbytes
        self.dir = Path(root).expanduser() / f"tuili-kv-{self.fingerprint.hex()}"
        self.stats = DiskStats()
        self.shared = os.environ.get("TUILI_KV_DISK_SHARED", "") not in ("", "0")
        # Every stored or queued block, least recently used first; True once its file is in place.
        self.index: OrderedDict[bytes, bool] = OrderedDict()
        self.pending: dict[bytes, torch.Tensor] = {}  # queued or being written
        self._lock = threading.Lock()
        self._lock_file = None
        self.enabled = self._take_lock()
        if not self.enabled:
            return
        self._scan()
        self._writers = ThreadPoolExecutor(write_workers, thread_name_prefix="kv-disk-write")
        self._readers = ThreadPoolExecutor(read_workers, thread_name_prefix="kv-disk-read")
        self._futures: set[Future] = set()
        log.info("disk KV tier: %s, %d of %d blocks of %d bytes in use from earlier runs",
                 self.dir, len(self.index), self.capacity, self.file_nbytes)

    # ---- set-up --------------------------------------------------------------
    def _take_lock(self) -> bool:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            f = open(self.dir / "lock", "a+")
        except OSError as e:
            raise ValueError(f"kv_disk_dir: cannot use {self.dir}: {e.strerror or e}") from None
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except OSError:
            f.close()
            log.warning("disk KV tier: %s is in use by another process; running without the disk tier", self.dir)
            return False
        self._lock_file = f
        return True

    def _scan(self) -> None:
        found: list[tuple[float, bytes]] = []
        bad = 0
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                path = Path(entry.path)
                st = entry.stat()
                if not entry.name.endswith(SUFFIX):
                    if not self.shared or time.time() - st.st_mtime > 3600:
                        path.unlink(missing_ok=True)  # an interrupted write
                    continue
                try:
                    h = bytes.fromhex(entry.name[: -len(SUFFIX)])
                except ValueError:
                    h = b""
                if st.st_size != self.file_nbytes or len(h) != 16:
                    bad += 1
                    path.unlink(missing_ok=True)
                    continue
                found.append((st.st_mtime, h))
        found.sort()
        excess = max(len(found) - self.capacity, 0)
        for _, h in found[:excess]:  # the bound shrank since the last run
            self._path(h).unlink(missing_ok=True)
        self.index.update((h, True) for _, h in found[excess:])
        if bad:
            self.stats.errors += bad
            log.warning("disk KV tier: dropped %d truncated or foreign files in %s", bad, self.dir)

    def _path(self, h: bytes) -> Path:
        x = h.hex()
        return self.dir / x[:2] / (x + SUFFIX)

    # ---- queries -------------------------------------------------------------
    def __contains__(self, h: bytes) -> bool:
        if not self.enabled:
            return False
        if h in self.index:
            return True
        return self.shared and self._adopt(h)

    def _adopt(self, h: bytes) -> bool:
        """Shared mode: a block file another process wrote joins this process's index."""
        try:
            if self._path(h).stat().st_size != self.file_nbytes:
                return False
        except OSError:
            return False
        with self._lock:
            if h in self.index:
                return True
            while len(self.index) >= self.capacity:
                victim = next((k for k, written in self.index.items() if written), None)
                if victim is None:
                    return False
                del self.index[victim]  # forgotten here only: the file may be another process's
                self.stats.evictions += 1
            self.index[h] = True
        return True

    def __len__(self) -> int:
        return len(self.index)

    @property
    def bytes_used(self) -> int:
        return len(self) * self.file_nbytes if self.enabled else 0

    # ---- writes --------------------------------------------------------------
    def touch(self, h: bytes) -> None:
        """Mark a stored block as just used (it moves to the end of the eviction order)."""
        with self._lock:
            if h in self.index:
                self.index.move_to_end(h)

    def put(self, h: bytes, payload: torch.Tensor) -> bool:
        """Queue a block for writing; returns False when it is not stored. Never waits on I/O."""
        if not self.enabled:
            return False
        assert payload.numel() == self.payload_nbytes, "payload size differs from this tier's blocks"
        with self._lock:
            if h in self.index:
                self.index.move_to_end(h)
                return True
            victims = []
            while len(self.index) >= self.capacity:
                victim = next((k for k, written in self.index.items() if written), None)
                if victim is None:  # all slots are being written
                    break
                del self.index[victim]
                victims.append(victim)
            self.stats.evictions += len(victims)
            if len(self.index) >= self.capacity:
                self.stats.dropped_writes += 1
                return False
            self.index[h] = False
            self.pending[h] = payload
        # The file's mtime is the time of this call, so the order survives a restart.
        fut = self._writers.submit(self._write, h, payload, victims, time.time_ns())
        self._track(fut)
        return True

    def _write(self, h: bytes, payload: torch.Tensor, victims: list[bytes], mtime_ns: int) -> None:
        for v in victims:
            self._path(v).unlink(missing_ok=True)
        path = self._path(h)
        data = payload.numpy()
        header = HEADER.pack(MAGIC, self.fingerprint, h, data.nbytes, checksum(data))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            if self.shared and path.exists():  # another process wrote this block: same content
                os.utime(path, ns=(mtime_ns, mtime_ns))
                raise _AlreadyThere()
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(data)
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, path)
        except _AlreadyThere:
            pass
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.pending.pop(h, None)
                self.index.pop(h, None)
            log.warning("disk KV tier: cannot write %s: %s", path, e)
            return
        with self._lock:
            self.pending.pop(h, None)
            if h in self.index:
                self.index[h] = True
            self.stats.blocks_written += 1

    def _track(self, fut: Future) -> None:
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._futures.discard(fut)
        if fut.exception() is not None:
            log.error("disk KV tier: write failed: %s", fut.exception())

    # ---- reads ---------------------------------------------------------------
    def get_many(self, hashes: list[bytes]) -> list[torch.Tensor | None]:
        """The payloads of `hashes` (None where missing or bad), read in parallel."""
        if not self.enabled or not hashes:
            return [None] * len(hashes)
        out: list[torch.Tensor | None] = [None] * len(hashes)
        to_read = []
        with self._lock:
            for i, h in enumerate(hashes):
                if h in self.pending:
                    out[i] = self.pending[h]
                elif h in self.index:
                    self.index.move_to_end(h)
                    to_read.append(i)
        for i, payload in zip(to_read, self._readers.map(self._read, [hashes[i] for i in to_read])):
            out[i] = payload
        return out

    def _read(self, h: bytes) -> torch.Tensor | None:
        path = self._path(h)
        buf = bytearray(self.file_nbytes)
        try:
            with open(path, "rb") as f:
                n = f.readinto(buf)
                extra = f.read(1)
            os.utime(path)  # the access time survives a restart
        except FileNotFoundError:  # evicted meanwhile
            self._forget(h)
            return None
        except OSError as e:
            return self._drop(h, f"cannot read: {e}")
        if n != self.file_nbytes or extra:
            return self._drop(h, "truncated" if n < self.file_nbytes else "too long")
        magic, fp, bh, length, digest = HEADER.unpack_from(buf)
        if magic != MAGIC or fp != self.fingerprint or bh != h or length != self.payload_nbytes:
            return self._drop(h, "foreign header")
        view = memoryview(buf)[HEADER.size:]
        if checksum(view) != digest:
            return self._drop(h, "checksum mismatch")
        with self._lock:
            self.stats.blocks_read += 1
        return torch.frombuffer(buf, dtype=torch.uint8, offset=HEADER.size)

    def _forget(self, h: bytes) -> None:
        with self._lock:
            self.index.pop(h, None)

    def _drop(self, h: bytes, why: str) -> None:
        path = self._path(h)
        self._forget(h)
        path.unlink(missing_ok=True)
        with self._lock:
            self.stats.errors += 1
        log.warning("disk KV tier: dropped %s (%s); its prefix will be recomputed", path.name, why)
        return None

    # ---- end -----------------------------------------------------------------
    def drain(self) -> None:
        """Wait until every queued write is on disk."""
        if not self.enabled:
            return
        while True:
            with self._lock:
                futs = list(self._futures)
            if not futs:
                return
            wait(futs)

    def close(self) -> None:
        if not self.enabled:
            return
        self.drain()
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.enabled = False
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
