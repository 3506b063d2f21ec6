"""GPU benchmarks of tuili on random-weight Llama shapes (~135M and ~1B parameters).

Parts (`--parts`, comma-separated, default all):
- bandwidth:  device copy bandwidth measured here with torch (bytes read + written per second).
- decode:     batch-1 decode tok/s of tuili (bf16) against the bandwidth ceiling, i.e.
              measured bandwidth / bytes of weights read per token.
- throughput: offline throughput, C requests submitted at once (C = 64 and 256), tuili's engine
              against transformers' `generate` on the same GPU, same prompts, same
              number of output tokens (EOS ignored, greedy).
- profile:    where a decode step's time goes: wall time per step, host time of the
              scheduler / model call / sampler, the forward's GPU time (CUDA events), and
              the kernels' summed device time (torch.profiler); a step's wall time minus
              its kernel time is what Python and launches cost.
- quant:      int8 / int4 weights and the int8 KV cache through PyTorch's ops on the device:
              op-level error against the dequantized weight at the model's widths, and
              batch-1 decode of the 135M shape in each mode.

Every record is one JSON line in `--out`. A part that fails writes a record with
"error" and the next part runs. `--tiny --device cpu` runs everything on very small
shapes in seconds, to prove the script end to end without a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, make_folder, param_count  # noqa: E402
import quant_check  # noqa: E402
from timers import ForwardTimer, Timers  # noqa: E402

from tuili.bench.decode import decode_once  # noqa: E402
from tuili.engine.engine import Engine  # noqa: E402
from tuili.sampling import SamplingParams  # noqa: E402

PARTS = ("bandwidth", "decode", "throughput", "profile", "quant")


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.shapes = ["tiny", "tiny2"] if args.tiny else args.shapes.split(",")
        self.concurrency = [4, 8] if args.tiny else [int(c) for c in args.concurrency.split(",")]
        self.out_len = 8 if args.tiny else args.output_len
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bandwidth_gbs: float | None = None

    # ---- plumbing ------------------------------------------------------------
    def emit(self, record: dict[str, Any]) -> None:
        record = {**record, "device": self.device_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.args.out, "a") as f:
            f.write(line + "\n")

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def folder(self, shape: str, tokenizer: bool = False) -> Path:
        gen = "cuda" if self.device.type == "cuda" else "cpu"
        return make_folder(shape, self.workdir, device=gen, tokenizer=tokenizer)

    def engine(self, shape: str, **options: Any) -> Engine:
        opts = dict(device=str(self.device), dtype="bfloat16", kv_cache_memory="256MiB" if self.tiny else "8GiB")
        opts.update(options)
        return Engine(str(self.folder(shape)), **opts)

    def prompts(self, shape: str, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        vocab = SHAPES[shape]["vocab_size"]
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]

    # ---- parts ---------------------------------------------------------------
    def bandwidth(self) -> None:
        nbytes = (64 << 20) if self.tiny else (2 << 30)
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        self.sync()
        reps = 5 if self.tiny else 20
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / reps
        else:
            t = time.perf_counter()
            for _ in range(reps):
                dst.copy_(src)
            seconds = (time.perf_counter() - t) / reps
        self.bandwidth_gbs = 2 * nbytes / seconds / 1e9
        self.emit({"part": "bandwidth", "copy_bytes": nbytes, "read_plus_write_GBps": round(self.bandwidth_gbs, 1)})
        del src, dst

    def decode(self) -> None:
        if self.bandwidth_gbs is None:
            self.bandwidth()
        prompt_len, out_len = (16, 16) if self.tiny else (128, 256)
        for shape in self.shapes:
            eng = self.engine(shape, num_kv_blocks=None)
            prompt = self.prompts(shape, 1, prompt_len, prompt_len)[0]
            decode_once(eng, prompt[:8], 4)  # warm-up
            runs = [decode_once(eng, prompt, out_len) for _ in range(3)]
            tok_s = statistics.median(runs)
            wbytes = eng.model.weight_bytes()
            # bytes read per decoded token: every weight once (tied head = the embedding table)
            # plus the KV cache of the mean context over the run
            kv_read = eng.kv_bytes_per_block // eng.config.block_size * (prompt_len + out_len // 2)
            ceiling = self.bandwidth_gbs * 1e9 / (wbytes + kv_read)
            self.emit({"part": "decode", "shape": shape, "params": param_count(shape), "dtype": "bfloat16",
                       "weight_bytes": wbytes, "kv_bytes_read_per_token": kv_read, "prompt_len": prompt_len, "output_len": out_len,
                       "decode_tok_s": round(tok_s, 1), "decode_tok_s_runs": [round(r, 1) for r in runs],
                       "ms_per_token": round(1e3 / tok_s, 3), "bandwidth_ceiling_tok_s": round(ceiling, 1),
                       "fraction_of_ceiling": round(tok_s / ceiling, 3)})
            del eng
            self.free()

    def throughput(self) -> None:
        """One tuili engine and one transformers model per shape, each run at every C."""
        lo, hi = (8, 24) if self.tiny else (64, 192)
        for shape in self.shapes:
            workloads = {c: self.prompts(shape, c, lo, hi, seed=c) for c in self.concurrency}
            tuili = self.guard(lambda: self.throughput_tuili(shape, workloads), f"throughput tuili {shape}") or {}
            hf = self.guard(lambda: self.throughput_hf(shape, workloads), f"throughput transformers {shape}") or {}
            for c in self.concurrency:
                record = {"part": "throughput", "shape": shape, "concurrency": c, "requests": c,
                          "input_len": f"{lo}-{hi}", "output_len": self.out_len, "dtype": "bfloat16"}
                record.update({f"tuili_{k}": v for k, v in tuili.get(c, {}).items()})
                record.update({f"transformers_{k}": v for k, v in hf.get(c, {}).items()})
                if c in tuili and c in hf:
                    record["ratio_tuili_over_transformers"] = round(tuili[c]["output_tok_s"] / hf[c]["output_tok_s"], 3)
                self.emit(record)

    def throughput_tuili(self, shape: str, workloads: dict[int, list[list[int]]]) -> dict[int, dict[str, Any]]:
        eng = self.engine(shape, max_num_seqs=max(256, *workloads))
        params = SamplingParams(temperature=0, max_tokens=self.out_len, ignore_eos=True)
        first = next(iter(workloads.values()))
        eng.generate([(f"warm-{i}", p[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                      for i, p in enumerate(first[:8])])
        results = {}
        for c, prompts in workloads.items():
            self.sync()
            steps = produced = 0
            start = time.perf_counter()
            for i, p in enumerate(prompts):
                eng.add_request(f"c{c}-r{i}", p, params)
            while eng.has_unfinished_requests():
                for d in eng.step():
                    produced += sum(len(o.token_ids) for o in d.outputs)
                steps += 1
            self.sync()
            elapsed = time.perf_counter() - start
            results[c] = {"elapsed_s": round(elapsed, 3), "output_tokens": produced, "steps": steps,
                          "output_tok_s": round(produced / elapsed, 1), "preemptions": eng.stats()["preemptions"]}
        del eng
        self.free()
        return results

    def throughput_hf(self, shape: str, workloads: dict[int, list[list[int]]]) -> dict[int, dict[str, Any]]:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(self.folder(shape)), dtype=torch.bfloat16).to(self.device).eval()
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        attn = getattr(hf.config, "_attn_implementation", None)
        results = {}
        with torch.inference_mode():
            warm = torch.full((8, 8), 5, device=self.device)
            hf.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4,
                        **kwargs)
            for c, prompts in workloads.items():
                width = max(len(p) for p in prompts)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
                self.sync()
                start = time.perf_counter()
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.out_len,
                                  min_new_tokens=self.out_len, **kwargs)
                self.sync()
                elapsed = time.perf_counter() - start
                produced = (out.shape[1] - width) * len(prompts)
                results[c] = {"elapsed_s": round(elapsed, 3), "output_tokens": produced,
                              "output_tok_s": round(produced / elapsed, 1), "attn_implementation": attn,
                              "batch": len(prompts)}
                del out
        del hf
        self.free()
        return results

    def profile(self) -> None:
        """One engine per shape; at each batch size, decode-only steps are timed, then profiled."""
        batches = [1, 4] if self.tiny else [1, 64, 256]
        for shape in self.shapes:
            eng = self.guard(lambda: self.engine(shape, max_num_seqs=max(256, *batches)), f"profile {shape} engine")
            if eng is None:
                continue
            for b in batches:
                self.guard(lambda: self.profile_one(eng, shape, b), f"profile {shape} b={b}")
                for rid in list(eng.requests):
                    eng.abort_request(rid)
            del eng
            self.free()

    def profile_one(self, eng: Engine, shape: str, batch: int) -> None:
        steps = 5 if self.tiny else 30
        prompts = self.prompts(shape, batch, 32, 32, seed=batch)
        params = SamplingParams(temperature=0, max_tokens=4 * steps + 16, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"b{batch}-p{i}", p, params)
        while eng.scheduler.waiting or any(s.num_output_tokens == 0 for s in eng.scheduler.running):
            eng.step()  # prefill everything first: the timed steps are decode-only
        timers = Timers()
        timers.wrap(eng.scheduler, "schedule")
        timers.wrap(eng.runner, "_logits", "model_and_inputs")
        timers.wrap(eng.runner, "sampler", "sampler")
        fwd = ForwardTimer(eng.model, self.device)
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t)
        fwd.remove()
        timers.restore()
        host = {k: round(1e3 * v / steps, 3) for k, v in timers.total.items()}
        kernel_ms, table = self.kernel_time(eng, steps)
        wall_ms = 1e3 * statistics.mean(walls)  # means throughout: the host and kernel times are means too
        record = {"part": "profile", "shape": shape, "batch": batch, "steps": steps,
                  "step_wall_ms": round(wall_ms, 3), "step_wall_ms_median": round(1e3 * statistics.median(walls), 3),
                  "host_ms": host,
                  "forward_host_ms": round(fwd.host_ms(), 3), "forward_gpu_ms": fwd.gpu_ms(),
                  "kernel_ms_per_step": None if kernel_ms is None else round(kernel_ms, 3)}
        if kernel_ms is not None:
            record["python_and_launch_overhead_ms"] = round(wall_ms - kernel_ms, 3)
            record["gpu_busy_fraction"] = round(kernel_ms / wall_ms, 3)
        self.emit(record)
        with open(Path(self.args.out).with_suffix(".profiles.txt"), "a") as f:
            f.write(f"==== {shape} batch {batch}: top ops by device (or CPU) time over {steps} decode steps\n{table}\n")

    def kernel_time(self, eng: Engine, steps: int) -> tuple[float | None, str]:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                eng.step()
            self.sync()
        avg = prof.key_averages()
        if self.device.type != "cuda":
            return None, avg.table(sort_by="self_cpu_time_total", row_limit=15)
        from torch.autograd import DeviceType

        # only the device-side events (kernels, copies, memsets): a CPU op's own device time
        # repeats its kernels' time
        total_us = sum(e.self_device_time_total for e in avg if getattr(e, "device_type", None) == DeviceType.CUDA)
        return total_us / 1e3 / steps, avg.table(sort_by="self_device_time_total", row_limit=20)

    def quant(self) -> None:
        quant_check.run(self)

    # ---- helpers -------------------------------------------------------------
    @staticmethod
    def short(e: Exception) -> str:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"

    def time_ms(self, fn: Callable[[], Any], reps: int = 5) -> float:
        fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return round(1e3 * (time.perf_counter() - t) / reps, 4)

    def guard(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failure must not stop the other figures
            traceback.print_exc()
            self.emit({"part": "error", "what": what, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            self.free()
            return None

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="very small shapes and counts (CPU smoke run)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--shapes", default="135m,1b")
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/tuili-gpu-models")
    ap.add_argument("--out", default="bench.jsonl")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.py: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    run = Run(args)
    run.emit({"part": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "transformers": __import__("transformers").__version__, "argv": sys.argv[1:]})
    status = 0
    for part in args.parts.split(","):
        if part not in PARTS:
            print(f"bench.py: unknown part {part!r}; parts: {', '.join(PARTS)}", file=sys.stderr)
            return 2
        t = time.perf_counter()
        if run.guard(getattr(run, part), part) is None and part not in ("bandwidth", "decode", "throughput",
                                                                         "profile", "quant"):
            status = 1
        print(f"[bench] {part} took {time.perf_counter() - t:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
