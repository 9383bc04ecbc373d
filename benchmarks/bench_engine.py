"""Benchmark the plastic-layer engines: reference loop vs fast vs cpp (vs fused), one table per device.

For (N, B, T) in SIZES: median wall time of forward+backward and of a no-grad forward, and
the peak resident memory of the process that ran it (CPU; on CUDA the peak allocated GPU
memory). "cpp" is the compiled kernel of mpn_cpp (CPU only; built on first use, outside the
timing; on CUDA, or where it cannot be built, it runs "fast" and its column says so). "fused"
(mpn_fused: each time step one torch.compile'd function) is measured on CUDA, and on the CPU
with --fused; its compile happens in the untimed warm-up call, whose time is printed below
the table. Every measurement runs in its own subprocess so the peaks do not mix. The default
workload is SPEC §1.1 at its defaults (mult, hebb_assoc, scalar trainable η, λ = 0.99, clip
±1), loss = sum(h²) + sum(M), so both outputs carry gradient.

The paper-size reference needs ~20 GB for forward+backward (five (B, N, N) tensors kept per
step); it runs at full length only when /proc/meminfo says that fits with margin, and
otherwise at `--ref_steps` steps with time and memory extrapolated linearly in T (marked ~).
A watchdog kills any measurement that drives available memory under 1.5 GB.

Run:  python benchmarks/bench_engine.py            (full; ~10-20 min on 2 cores)
      python benchmarks/bench_engine.py --quick    (1 repeat, shorter references)
The machine may be shared: the load average at the start and end is printed with the table.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mpn_cpp  # noqa: E402
import mpn_engine  # noqa: E402

SIZES = [(300, 128, 100), (100, 64, 100), (64, 32, 100)]  # (N, B, T)
REF_STATE_PER_STEP = 5  # (B, N, N) tensors the reference keeps per step for backward
MIN_FREE_BYTES = 1.5e9  # watchdog: kill a measurement below this much available memory


def make_inputs(N, B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bound = (6 / (2 * N)) ** 0.5
    x = torch.tanh(torch.randn(B, T, N, generator=g)).to(device).requires_grad_()
    W = ((torch.rand(N, N, generator=g) * 2 - 1) * bound).to(device).requires_grad_()
    b = (torch.randn(N, generator=g) / N ** 0.5).to(device).requires_grad_()
    eta = torch.tensor(1.0, device=device, requires_grad=True)
    lam = torch.tensor(0.99, device=device)
    return x, W, b, eta, lam


def worker(N, B, T, engine, mode, repeats, warmup, device):
    """One measurement in this process; prints a JSON line."""
    x, W, b, eta, lam = make_inputs(N, B, T, device)
    base = torch.cuda.memory_allocated() if device == "cuda" else peak_rss()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        if mode == "nograd":
            with torch.no_grad():
                mpn_engine.plastic_forward(x, W, b, eta, lam, engine=engine)
        else:
            h, M = mpn_engine.plastic_forward(x, W, b, eta, lam, engine=engine)
            (h.square().sum() + M.sum()).backward()
        sync()

    t0 = time.perf_counter()
    for _ in range(warmup):
        once()
    first_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    kernel = engine == "cpp" and device == "cpu" and mpn_cpp.kernel() is not None
    print(json.dumps(dict(times=times, peak_bytes=peak, base_bytes=base, kernel=kernel,
                          build_s=mpn_cpp._state["build_s"], warmup_s=first_s)))


def peak_rss():
    """Peak resident set of this process in bytes. VmHWM, not getrusage: ru_maxrss carries
    the parent's high-water mark over fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def measure(N, B, T, engine, mode, repeats, warmup, device):
    """Run `worker` in a subprocess under the memory watchdog; returns dict or None."""
    cmd = [sys.executable, __file__, "--worker", json.dumps([N, B, T, engine, mode, repeats,
                                                             warmup, device])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if mem_available() < MIN_FREE_BYTES:
            proc.kill()
            proc.wait()
            print(f"  killed {engine} {mode} N={N} B={B} T={T}: memory ran low", flush=True)
            return None
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        print(f"  {engine} {mode} N={N} B={B} T={T} failed:\n{err[-2000:]}", flush=True)
        return None
    res = json.loads(out.strip().splitlines()[-1])
    res["median"] = statistics.median(res["times"])
    return res


def reference_steps(N, B, T, mode, args):
    """Steps to run the reference for: all T when its autograd state fits in memory."""
    if mode == "nograd":
        return T
    need = REF_STATE_PER_STEP * B * N * N * 4 * T + 2e9
    if need < 0.8 * mem_available():
        return T
    return min(T, args.ref_steps)


def bandwidth_gbs(device, mbytes=512):
    """Memory bandwidth from a large tensor copy (bytes read + written per second)."""
    a = torch.ones(mbytes * 2 ** 20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(times) / 1e9


def run_device(device, args):
    print(f"\n== device: {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} "
          f"{'' if device == 'cuda' else 'cores, torch threads = %d' % torch.get_num_threads()})")
    print(f"load average at start: {os.getloadavg()}")
    bw = bandwidth_gbs(device)
    print(f"measured bandwidth (512 MB copy): {bw:.1f} GB/s")
    with_fused = device == "cuda" or args.fused
    header = (f"{'N':>4} {'B':>4} {'T':>4} {'mode':>7} | {'ref s':>8} {'fast s':>8} {'cpp s':>8}"
              f" {'fast x':>7} {'cpp x':>7} | {'ref MB':>8} {'fast MB':>8} {'cpp MB':>8}"
              f" {'ref/fast':>8} {'ref/cpp':>8} | {'floor s':>7} | {'fused s':>8} {'fused x':>7}"
              f" {'fused MB':>8}")
    print(header + "\n" + "-" * len(header), flush=True)
    rows, notes = [], []
    for N, B, T in SIZES:
        for mode in ("grad", "nograd"):
            rep = 1 if args.quick else args.repeats
            fast = measure(N, B, T, "fast", mode, rep, 1, device)
            cpp = measure(N, B, T, "cpp", mode, rep, 1, device)
            fused = measure(N, B, T, "fused", mode, rep, 1, device) if with_fused else None
            t_ref = reference_steps(N, B, T, mode, args)
            big = B * N * N >= 128 * 300 * 300
            ref = measure(N, B, t_ref, "reference", mode, min(rep, 2) if big else rep,
                          0 if big else 1, device)
            scale = T / t_ref
            mark = "~" if scale != 1 else " "
            # bytes moved per step at the very least: M read and written once (forward);
            # forward+backward ~3.5x that (forward, recompute, reverse pass over M and dL/dM)
            floor = 2 * B * N * N * 4 * T * (3.5 if mode == "grad" else 1.0) / (bw * 1e9)
            if fast is None or ref is None or cpp is None:
                print(f"{N:>4} {B:>4} {T:>4} {mode:>7} | measurement failed", flush=True)
                continue
            rt = ref["median"] * scale
            rm = (ref["base_bytes"] + (ref["peak_bytes"] - ref["base_bytes"]) * scale) / 2 ** 20
            ft, fm = fast["median"], fast["peak_bytes"] / 2 ** 20
            ct, cm = cpp["median"], cpp["peak_bytes"] / 2 ** 20
            kmark = " " if cpp["kernel"] else "*"
            fused_cols = f" | {'-':>8} {'-':>7} {'-':>8}"
            if fused is not None:
                ut, um = fused["median"], fused["peak_bytes"] / 2 ** 20
                fused_cols = f" | {ut:>8.3f} {rt / ut:>6.1f}x {um:>8.0f}"
                notes.append(f"fused {mode} N={N} B={B} T={T}: warm-up call (compiles) "
                             f"{fused['warmup_s']:.1f} s")
            elif with_fused:
                fused_cols = f" | {'failed':>8} {'-':>7} {'-':>8}"
            rows.append(dict(N=N, B=B, T=T, mode=mode, ref_s=rt, fast_s=ft, cpp_s=ct, ref_MB=rm,
                             fast_MB=fm, cpp_MB=cm, cpp_kernel=cpp["kernel"],
                             fused_s=None if fused is None else fused["median"],
                             extrapolated_from_T=t_ref if scale != 1 else None))
            print(f"{N:>4} {B:>4} {T:>4} {mode:>7} | {rt:>7.2f}{mark} {ft:>8.3f} {ct:>7.3f}{kmark}"
                  f" {rt / ft:>6.1f}x {rt / ct:>6.1f}x | {rm:>7.0f}{mark} {fm:>8.0f} {cm:>8.0f}"
                  f" {rm / fm:>7.1f}x {rm / cm:>7.1f}x | {floor:>7.3f}{fused_cols}", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print("~ = reference run for fewer steps (memory guard); its time, and its memory above"
          " the inputs, scaled to T.")
    print("CPU memory is the peak RSS of the measuring process (includes ~300 MB of torch);"
          " floor = minimum DRAM bytes moved / measured bandwidth.")
    print("* = the compiled kernel was not used (CUDA, or it could not be built): 'cpp' ran"
          " 'fast'.")
    for note in notes:
        print(note)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--ref_steps", type=int, default=25,
                   help="steps for a paper-size reference that would not fit in memory")
    p.add_argument("--sizes", default=None, help="e.g. '64,32,100;100,64,100' (N,B,T)")
    p.add_argument("--device", default="all", help="'cpu', 'cuda' or 'all' (cuda if present)")
    p.add_argument("--fused", action="store_true",
                   help="also measure engine 'fused' on the CPU (always measured on CUDA)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*json.loads(args.worker))
    if args.sizes:
        SIZES[:] = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cpu" in devices:  # build (or find) the kernel once, before any timing
        t0 = time.perf_counter()
        ok = mpn_cpp.kernel() is not None
        print(f"compiled kernel: {'ready' if ok else 'unavailable: ' + str(mpn_cpp._state['error'])}"
              f" ({time.perf_counter() - t0:.1f} s to build or load)")
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n(no CUDA device here: CPU only)")
            continue
        run_device(device, args)


if __name__ == "__main__":
    main()
