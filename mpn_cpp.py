"""Compiled CPU kernel for the plastic-layer sequence (SPEC §1.1): engine "cpp" of mpn_engine.

Same equations, conventions and backward structure as mpn_engine's "fast" engine, but every
time step of one trial is ONE fused pass over M (row by row: the row's dot product gives a_i,
then h_i, then the same row of M is updated while it is still in L1), and every reverse step is
one fused pass over (M_{t-1}, dL/dM, W, the dW accumulator). Each trial's M stays in the
core's L2 for the whole sequence.

Threads (`threads()`: one unless MPN_KERNEL_THREADS says more; the kernel's own std::threads,
joined, never spinning): the forward hands trials out one at a time to the threads. The
backward reverses trials one after another (the dW accumulator is one running sum in trial
order), each thread owning a band of M's rows: a row's recurrences read no other row, and the
few sums over rows (dx_t; η's and λ's column gradients) pass from band to band at each step,
continued where the band above stopped (version 9; before, a second thread only recomputed the
next trial's forward, which W_rec still uses). Results are bit-identical for any thread count,
so a run does not depend on it. (Until version 5 the kernel called
at::parallel_for, but the extension is built without -fopenmp, so that always ran every trial
on one thread; torch's own threads then only served the small ops around the kernel, and
their OpenMP spin-waits made a loaded machine 5-7x slower: see configs/cpu_quick.py.)

Padded tails (trial_end): random_batch pads a batch to its longest trial, with zero input
after each trial's own end, and the loss ignores those steps; in the CPU preset's training
batches they are 30% of all steps. The forward runs a trial's steps after its last nonzero
input without their dot products (x_t = 0, so a_t = b and M only decays), the backward skips
them (no step after the last nonzero dL/dh can feed a gradient), bit-identical to running
them (tested). CPU preset training step on one thread: 32.9 -> 23.0 ms, of which the kernel's
forward + backward 29.7 -> 20.3; validation pass 0.68 -> 0.42 s (6 Dec).

Backward per trial: a first forward pass keeps M only at segment starts (every `seg` steps);
then, segment by segment from the last, the segment is recomputed from its checkpoint storing
its M_{t-1} history (at most SEG_BYTES per thread: the whole sequence at the paper size, which
then needs no checkpoint pass) and the reverse recurrence walks back through it:
    M̃_t = λ ⊙ M_{t-1} + η ⊙ post_t x_tᵀ   (recomputed from M_{t-1}; no read of M_t)
    G̃ = G ⊙ 1[lo < M̃_t < hi] ⊙ keep        (≤ for a fractional keep, as the fast engine)
    δ_t = (dL/dh_t + [hebb_assoc] η (G̃ x_t) + W_recᵀ δ_{t+1}) ⊙ mask ⊙ (1 − g_t²)
    G ← λ ⊙ G̃ + W ⊙ δ_t x_tᵀ  (mult; add: + δ_t x_tᵀ)
    dW += δ_t x_tᵀ ⊙ (1 + M_{t-1}),  dx_t = (W ⊙ (1 + M_{t-1}))ᵀ δ_t + (η ⊙ G̃)ᵀ post_t
Unlike the fast engine, W ⊙ (1 + M) is never split into W + W ⊙ M (which cancels badly in
float32 where M ≈ −1), so a_t, dx and dW are computed in the same form as the reference loop.
Only W_rec's gradient is left to one matmul outside.

η and λ must be rank-1 (scalar, (1, N_pre) or (N_post, 1)); they enter as a row factor times
a column factor. Matrix η/λ, per-trial W, record callbacks, CUDA tensors and masks that
require grad are not handled here (`unsupported` says why; mpn_engine then uses "fast").

The extension is built lazily on first use with torch.utils.cpp_extension.load (needs a C++
compiler and ninja) from two translation units beside this file that ninja compiles side by
side: mpn_kernel.cpp, the kernel in plain C++ on raw pointers, and mpn_binding.cpp, its
torch/pybind11 binding (mpn_kernel.h holds what they share). The first build takes ~23 s on 2
idle cores (7 Dec; as one unit behind <torch/extension.h>, 55 s, 37 of them parsing that
header, and 64-77 s in the pipeline's fresh-clone runs); the same source compiled either way
gives the same bits (the bench's weight hash). It is cached in torch's extensions directory;
if the build fails, or MPN_CPP=0 is set, `kernel()` returns None once and for all and a
single warning is logged.

Measured with version 4, i.e. on one thread (benchmarks/bench_engine.py, 2 shared cores, paper
size N = 300, B = 128, T = 100, float32): forward+backward 2.1-2.8 s, 26-27x the reference loop
(fast: 9-10x); no-grad forward 0.5-0.8 s, 34-35x (fast: 21x); peak RSS ~520 MB.
"""
import contextlib
import logging
import math
import os
import threading
import time

import torch

log = logging.getLogger(__name__)

SEG_BYTES = 1 << 26  # M history kept per thread while reversing a segment (in L3 here)

# The kernel's C++ beside this file: two translation units that ninja compiles side by side
# (one unit behind <torch/extension.h> took ~55 s here, ~37 s of it parsing that header; now
# the two take ~20 s each, in parallel) and the header both include.
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, f) for f in ("mpn_kernel.cpp", "mpn_binding.cpp")]
HEADER = os.path.join(_HERE, "mpn_kernel.h")

_VERSION = 10  # bump when the C++ changes meaning (torch's load also rebuilds on any edit)


def _name():
    """Extension name, keyed by the CPU's instruction-set flags (the build uses -march=native,
    so a cache directory shared between different machines never loads a foreign build), by
    the torch installation and by this checkout's folder (two virtualenvs, or two clones, would
    otherwise rebuild over each other's build, ~25 s each time: a build's command names its
    source files)."""
    import hashlib
    import sys
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    key = (f"{flags}|{torch.__version__}|{os.path.dirname(torch.__file__)}|"
           f"{sys.version_info[:2]}|{_HERE}")
    return f"mpn_plastic_kernel_v{_VERSION}_{hashlib.md5(key.encode()).hexdigest()[:8]}"


_lock = threading.Lock()
_state = {"module": None, "tried": False, "error": None, "build_s": None}


CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd"]


def _failed_marker(name):
    """File that records a failed compile, so later processes do not spend a minute retrying
    a build that cannot work (delete it to retry)."""
    import hashlib
    from torch.utils.cpp_extension import _get_build_directory
    key = hashlib.md5((_source_text() + " ".join(CFLAGS)).encode()).hexdigest()[:8]
    return os.path.join(_get_build_directory(name, verbose=False), f"BUILD_FAILED_{key}.txt")


def _source_text():
    """The kernel's C++ (both units and their header), what a build is keyed on."""
    text = []
    for path in SOURCES + [HEADER]:
        with open(path) as f:
            text.append(f.read())
    return "".join(text)


STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (one takes < 2 min)


def _clear_stale_lock(name):
    """Removes the build directory's `lock` file when it is older than STALE_LOCK_S: torch
    creates it for the duration of a build, and a build killed midway leaves it behind, after
    which every later process would wait for it forever. Says so when it does."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    log.warning("mpn_cpp: removed a build lock %.0f min old (%s), left by an interrupted "
                "build; building again", age / 60, lock)
    return True


def kernel():
    """The compiled extension, building it on first call; None if it cannot be built."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("MPN_CPP", "1") == "0":
            _state["error"] = "disabled by MPN_CPP=0"
        else:
            t0 = time.perf_counter()
            name, marker = _name(), None
            _state["error"] = None
            try:
                marker = _failed_marker(name)
                if os.path.exists(marker):
                    raise RuntimeError(f"an earlier build failed ({marker}; delete it to retry)")
                _clear_stale_lock(name)
                from torch.utils.cpp_extension import load
                _state["module"] = load(name, sources=SOURCES, extra_cflags=CFLAGS,
                                        verbose=False)
            except Exception as e:  # no compiler / ninja, or a build error: fall back
                lines = str(e).strip().splitlines()
                _state["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
                if marker and "Error building extension" in str(e):
                    try:
                        with open(marker, "w") as f:
                            f.write(str(e))
                    except OSError:
                        pass
            _state["build_s"] = time.perf_counter() - t0
            log.info("mpn_cpp: kernel built or loaded in %.1f s", _state["build_s"])
        if _state["module"] is None:
            log.warning("mpn_cpp: compiled kernel unavailable (%s); using the 'fast' engine",
                        _state["error"])
        _state["tried"] = True
        return _state["module"]


def _rank1(p, n_post, n_pre):
    """(row factor (N_post,), column factor (N_pre,), kind) for a rank-1 η or λ, else None."""
    shape = (1,) * (2 - p.dim()) + tuple(p.shape) if p.dim() <= 2 else None
    v = p.detach()
    if shape == (1, 1):
        return v.reshape(1).expand(n_post).contiguous(), v.new_ones(n_pre), "scalar"
    if shape == (1, n_pre):
        return v.new_ones(n_post), v.reshape(n_pre).contiguous(), "pre"
    if shape == (n_post, 1):
        return v.reshape(n_post).contiguous(), v.new_ones(n_pre), "post"
    return None


def unsupported(x, W, b, eta, lam, *, W_rec=None, hid_mask=None, m_freeze=None, record=None):
    """Why the kernel cannot run this call (one sentence), or None. Assumes the fast engine
    accepts the call (mpn_engine.fast_unsupported is None)."""
    if x.device.type != "cpu":
        return "the compiled kernel is CPU-only"
    if record is not None:
        return "a record callback needs the per-step Python loop"
    if W.dim() != 2:
        return "per-trial W"
    if x.shape[0] == 0 or x.shape[1] == 0:
        return "empty batch or sequence"
    n_post, n_pre = W.shape
    for name, p in (("eta", eta), ("lam", lam)):
        if p.dim() > 2 or _rank1(p, n_post, n_pre) is None:
            return f"{name} is a matrix"
    return None


def _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, cfg):
    mp_type, m_update, m_bounds = cfg
    B, T, n_pre = x.shape
    n_post = W.shape[0]
    er, ec, eta_kind = _rank1(eta, n_post, n_pre)
    lr, lc, lam_kind = _rank1(lam, n_post, n_pre)
    mask = None if hid_mask is None else hid_mask.detach().expand(B, n_post).contiguous()
    keep_bs = 0
    strict = True
    if keep is not None:
        keep = keep.detach()
        strict = bool(((keep == 0) | (keep == 1)).all())
        if keep.dim() == 3 and keep.shape[0] == B and B > 1:
            keep, keep_bs = keep.contiguous(), n_post * n_pre
        else:
            keep = keep.expand(1, n_post, n_pre)[0].contiguous()
    lo, hi = (-math.inf, math.inf) if m_bounds is None else (float(m_bounds[0]),
                                                             float(m_bounds[1]))
    args = (x.detach().contiguous(), W.detach().contiguous(), b.detach().contiguous(),
            er, ec, lr, lc,
            None if W_rec is None else W_rec.detach().contiguous(), mask, keep, keep_bs,
            mp_type == "mult", m_update == "hebb_assoc", strict, lo, hi)
    return args, eta_kind, lam_kind


_threads_override = None


@contextlib.contextmanager
def using_threads(n):
    """Inside the block the kernel runs on n threads (0 or None: threads() as outside). For a
    stage whose kernel calls are long (the lesion suite's passes of many trials), where one
    join per call costs little even on a busy machine."""
    global _threads_override
    old = _threads_override
    _threads_override = int(n) if n else old
    try:
        yield
    finally:
        _threads_override = old


def threads():
    """The kernel's own threads: using_threads' count inside its block, else
    $MPN_KERNEL_THREADS, else 1. One by default: the threads join
    once per trial in the backward, and on a busy machine each join waits for the OS to run
    the other thread (measured with the CPU preset at load average ~4: 38 steps/s on one
    kernel thread, 19 on two). On an idle machine 2 let the backward recompute the next trial
    beside the reverse pass (CPU preset: 10-30% more steps/s; training chooses per interval,
    AdaptiveThreads). They are independent of torch's intra-op threads (`num_threads`), which the
    kernel never uses."""
    if _threads_override:
        return _threads_override
    value = os.environ.get("MPN_KERNEL_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


class AdaptiveThreads:
    """The kernel's threads for the next stretch of a training run, 1 or `most`, chosen from
    what the last stretch measured (results do not depend on the choice). On `most` threads
    the process uses more than one core while a core is free (the CPU preset on 2 idle cores:
    1.45-1.5 cores, 10-30% more steps/s than on one thread); when other programs take the
    cores the threads' per-trial joins wait for the OS and it falls to ~1 core or less,
    slower than one thread (19 vs 38 steps/s at load 4), so the next stretch runs on one. A
    free core is invisible from one thread, so after `probe_every` stretches on one it tries
    `most` for a stretch again; each probe that fails doubles that wait (up to 8x), so a busy
    machine loses at most one slow stretch in probe_every. adaptive=False keeps `most`
    throughout. Call `update()` between stretches and run the kernel under
    `using_threads(self.threads)`."""

    MIN_CORES = 1.2  # cores per wall second that show the extra threads ran in parallel

    def __init__(self, most=2, probe_every=10, adaptive=True, clock=None):
        self.most, self.adaptive = max(1, int(most)), adaptive
        self.threads = self.most
        self.probe_every, self.backoff, self.wait = probe_every, 1, 0
        self.clock = clock or (lambda: (time.perf_counter(), time.process_time()))
        self.last = self.clock()

    def update(self):
        """Ends a stretch: measures the cores it used, picks the next stretch's threads and
        returns (threads the stretch ran on, cores it used)."""
        wall, cpu = self.clock()
        cores = (cpu - self.last[1]) / max(wall - self.last[0], 1e-9)
        self.last, ran = (wall, cpu), self.threads
        if not self.adaptive:
            return ran, cores
        if self.threads > 1 and cores < self.MIN_CORES:  # the threads did not run side by side
            self.threads, self.wait = 1, self.probe_every * self.backoff
            self.backoff = min(8, 2 * self.backoff)
        elif self.threads > 1:
            self.backoff = 1
        elif self.most > 1:
            self.wait -= 1
            if self.wait <= 0:
                self.threads = self.most
        return ran, cores


def _segment(T, n_post, n_pre, itemsize):
    return int(max(1, min(T, SEG_BYTES // (n_post * n_pre * itemsize))))


class _KernelSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, eta, lam, W_rec, hid_mask, keep, cfg):
        args, _, _ = _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, cfg)
        h, M = kernel().mpn_forward(*args, threads(), None)
        ctx.save_for_backward(x, W, b, eta, lam, W_rec, hid_mask, keep)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return h, M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gM):
        x, W, b, eta, lam, W_rec, hid_mask, keep = ctx.saved_tensors
        n_in = ctx.needs_input_grad
        if gh is None and gM is None:
            return (None,) * 9
        args, eta_kind, lam_kind = _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, ctx.cfg)
        B, T, n_pre = x.shape
        n_post = W.shape[0]
        with torch.no_grad():
            d, dxp, acc, hs, eta_r, eta_c, lam_r, lam_c = kernel().mpn_backward(
                *args, None if gh is None else gh.contiguous(),
                None if gM is None else gM.contiguous(), n_in[0], n_in[1], n_in[4],
                n_in[4] and lam_kind == "pre", _segment(T, n_post, n_pre, x.element_size()),
                threads())
            dx = dxp if n_in[0] else None
            dW = acc.sum(0) if n_in[1] else None
            db = d.sum((0, 1)) if n_in[2] else None
            deta = dlam = None
            if n_in[3]:
                deta = {"scalar": lambda: eta_r.sum(), "post": lambda: eta_r.sum(0),
                        "pre": lambda: eta_c.sum(0)}[eta_kind]().reshape(eta.shape)
            if n_in[4]:
                dlam = {"scalar": lambda: lam_r.sum(), "post": lambda: lam_r.sum(0),
                        "pre": lambda: lam_c.sum(0)}[lam_kind]().reshape(lam.shape)
            dW_rec = None
            if n_in[5]:
                dW_rec = (d[:, 1:].reshape(-1, n_post).T @ hs[:, :-1].reshape(-1, n_post)
                          if T > 1 else torch.zeros_like(W_rec))
        return dx, dW, db, deta, dlam, dW_rec, None, None, None


def plastic_forward_cpp(x, W, b, eta, lam, keep, cfg, *, W_rec=None, hid_mask=None,
                        m_init=None):
    """Run the compiled kernel (caller checked `unsupported` and that `kernel()` is not None).
    keep = 1 − m_freeze or None; cfg = (mp_type, m_update, m_bounds tuple or None); m_init
    (B, N_post, N_pre): the M entering the first step (forward only, without W_rec), else 0."""
    args = (x, W, b, eta, lam, W_rec, hid_mask, keep)
    grad = torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args)
    if m_init is not None and (grad or W_rec is not None):
        raise ValueError("m_init continues a sequence forward only, without W_rec")
    if grad:
        return _KernelSequence.apply(*args, cfg)
    with torch.no_grad():
        a, _, _ = _prepare(*args, cfg)
        m0 = None if m_init is None else m_init.detach().to(x.dtype).expand(
            x.shape[0], W.shape[0], W.shape[1]).contiguous()
        return tuple(kernel().mpn_forward(*a, threads(), m0))
