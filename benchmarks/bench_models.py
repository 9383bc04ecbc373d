"""Forward and forward+backward time per batch, and peak memory, of every model.

Reads nothing, writes nothing; prints a table. Each configuration runs in its own subprocess
so its peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU) is its own. Timings on a
shared machine are indicative only.

Example:
    python benchmarks/bench_models.py              # dmpn at (300,128,100) and (100,64,100), vanilla, gru
    python benchmarks/bench_models.py --quick      # T = 20
    python benchmarks/bench_models.py --engine=reference --device=cpu
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (net, N hidden, B trials, T steps)
CONFIGS = [("dmpn", 300, 128, 100), ("dmpn", 100, 64, 100),
           ("vanilla", 300, 128, 100), ("gru", 300, 128, 100)]


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def backward_steps(net_name, n_hidden, batch, steps, engine, max_gb):
    """Steps the fwd+bwd run may use: the reference engine's autograd graph keeps ~8 (B, N, N)
    float32 tensors per step, so long dmpn trials are timed on fewer steps and scaled linearly
    in T (the recurrence costs the same at every step)."""
    import mpn
    if net_name != "dmpn" or mpn.resolve_engine(engine) != "reference":
        return steps
    per_step = 8 * 4 * batch * n_hidden * n_hidden
    return max(1, min(steps, int(max_gb * 2 ** 30 // per_step)))


def measure(net_name, n_hidden, batch, steps, device, engine, repeats, max_gb):
    """Seconds per forward, per forward+backward (scaled to `steps` when timed on fewer, see
    backward_steps), and peak memory (MiB) of one config."""
    import torch
    sys.path.insert(0, str(ROOT))
    import mpn
    kwargs = dict(n_hidden=n_hidden, seed=0)
    if net_name == "dmpn":
        kwargs["engine"] = engine
    net = mpn.build_model(net_name, **kwargs).to(device)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, steps, 21, generator=gen).to(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():  # warm-up
        net(u[:, :5])
    t_fwd, t_bwd = [], []
    bwd_steps = backward_steps(net_name, n_hidden, batch, steps, engine, max_gb)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            net(u)
        _sync(device)
        t_fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = net(u[:, :bwd_steps])
        (out["y"] ** 2).mean().backward()
        _sync(device)
        t_bwd.append((time.perf_counter() - t0) * steps / bwd_steps)
        del out
        net.zero_grad(set_to_none=True)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss is KiB on Linux; the delta is what the runs added over setup
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"fwd_s": min(t_fwd), "fwd_bwd_s": min(t_bwd), "peak_mib": peak,
            "bwd_steps": bwd_steps}


def run_in_subprocess(cfg, device, engine, repeats, threads, max_gb):
    code = ("import json, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d); "
            "import bench_models as b; print(json.dumps(b.measure(*%r, %r, %r, %d, %r)))"
            % (str(Path(__file__).parent), threads, tuple(cfg), device, engine, repeats,
               max_gb))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 20")
    ap.add_argument("--device", default="all", help="cpu, cuda or all (cuda if available)")
    ap.add_argument("--engine", default="auto", help="dmpn engine (mpn_engine.ENGINES)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats; the best is shown")
    ap.add_argument("--max_gb", type=float, default=3.0,
                    help="memory cap for the reference engine's autograd graph (GB); above it "
                         "dmpn is timed on fewer steps and scaled to T (marked *)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    import torch
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    repeats = args.repeats
    print(f"torch {torch.__version__}, {args.threads} CPU threads, engine={args.engine}"
          f"{' (quick: T=20)' if args.quick else ''}; peak memory: CPU = RSS growth, "
          f"GPU = max allocated")
    print(f"{'device':6} {'net':8} {'N':>4} {'B':>4} {'T':>4} {'fwd ms':>9} {'fwd+bwd ms':>11} "
          f"{'peak MiB':>9}")
    for device in devices:
        for net_name, n, b, t in CONFIGS:
            t = 20 if args.quick else t
            r = run_in_subprocess((net_name, n, b, t), device, args.engine, repeats,
                                  args.threads, args.max_gb)
            if "error" in r:
                print(f"{device:6} {net_name:8} {n:4d} {b:4d} {t:4d} failed: {r['error']}")
                continue
            print(f"{device:6} {net_name:8} {n:4d} {b:4d} {t:4d} {1e3 * r['fwd_s']:9.1f} "
                  f"{1e3 * r['fwd_bwd_s']:11.1f}{'*' if r['bwd_steps'] < t else ' '}"
                  f"{r['peak_mib']:9.0f}", flush=True)
    print("* fwd+bwd timed on fewer steps (see --max_gb) and scaled linearly to T")


if __name__ == "__main__":
    main()
