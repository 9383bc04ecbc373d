// The compiled CPU kernel of the plastic layer (engine "cpp" of mpn_engine): plain C++ on raw
// pointers, no torch headers, so it compiles in ~20 s beside mpn_binding.cpp. mpn_cpp.py
// builds both and documents the design, threads and measurements.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "mpn_kernel.h"

namespace {

using mpnk::BwdOut;
using mpnk::Prm;

// A select as a bit blend: GCC if-converts it, where a ?: whose arm holds a division (which
// may trap) stays a branch and keeps the loop over tanh_vec scalar.
static inline __attribute__((always_inline)) double pick(bool c, double a, double b) {
  uint64_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint64_t m = -static_cast<uint64_t>(c);
  const uint64_t u = (ua & m) | (ub & ~m);
  double out;
  std::memcpy(&out, &u, sizeof out);
  return out;
}

// tanh without a library call, so that a loop over it vectorises (std::tanh is a scalar call
// that took three quarters of the forward step). float input, double arithmetic: an odd
// polynomial for |a| < 0.625 (coefficients fitted by weighted least squares; relative error
// 2e-13), else (1 - e) / (1 + e) with e = exp(-2|a|) = 2^k exp(r), |r| <= ln2 / 2, exp(r) by
// its degree-8 Taylor polynomial (relative error 6e-10), then one rounding to float: within
// 0.5003 ulp of the exact tanh on 4.1 M points in [-12, 12] (correctly rounded but for 5 in a
// million). NaN stays NaN, ±inf gives ±1. double arguments keep std::tanh. Until version 7
// two ?: selects (and a double -> int64 conversion, which AVX2 lacks) kept that loop scalar,
// a third of the forward step's time; the same operations, vectorised, give the same bits.
static inline __attribute__((always_inline)) float tanh_vec(float a) {
  const float fa = std::fabs(a);
  const double t = pick(10.0f < fa, 10.0, fa);  // as std::min(fa, 10): NaN stays NaN
  const double z = t * t;
  static constexpr double C[8] = {-0.33333333327804954, 0.1333333287130527,
                                  -0.05396812145075109, 0.021867640203921866,
                                  -0.0088488519925966243, 0.0035259496501643247,
                                  -0.0012740969330960724, 0.00030260344608723109};
  double q = C[8 - 1];
  for (int k = 8 - 2; k >= 0; --k) q = q * z + C[k];
  const double small = t + t * z * q;
  const double y = -2.0 * t;
  // y log2(e) rounded to an integer k by the 1.5 * 2^52 shift: its low bits hold k (as
  // 2^51 + k), so 2^k's exponent is built with integer adds and shifts (no double -> int64
  // conversion, which AVX2 lacks)
  const double shifted = y * 1.4426950408889634 + 6755399441055744.0;
  const double kf = shifted - 6755399441055744.0;
  const double r = (y - kf * 0.6931471803691238) - kf * 1.9082149292705877e-10;
  double e = 1.0 / 40320;
  e = e * r + 1.0 / 5040;
  e = e * r + 1.0 / 720;
  e = e * r + 1.0 / 120;
  e = e * r + 1.0 / 24;
  e = e * r + 1.0 / 6;
  e = e * r + 0.5;
  e = e * r + 1.0;
  e = e * r + 1.0;
  uint64_t low;
  std::memcpy(&low, &shifted, sizeof low);
  const uint64_t bits = (low + 1023) << 52;  // 2^k, k in [-29, 0]: 2^51 shifts out
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  e *= scale;
  const double large = (1.0 - e) / (1.0 + e);
  return static_cast<float>(std::copysign(pick(t < 0.625, small, large),
                                          static_cast<double>(a)));
}

static inline double tanh_vec(double a) { return std::tanh(a); }


// The steps of trial b that can change anything: 1 + the last step whose input x_t (or, in
// the backward, whose dL/dh_t) has a nonzero entry. Steps after it are a padded trial's tail,
// where x_t = 0 (the embedding of a zero input) and dL/dh_t = 0 (masked out of the loss):
// the forward runs them IDLE, the backward not at all (its δ, dx and every gradient term are
// exact zeros there). W_rec (h_t then depends on h_{t-1}) or an incoming dL/dM_T (a gradient
// that flows through the tail) keep every step: the result is T.
template <typename S>
int64_t trial_end(const Prm<S>& p, int64_t b, const S* gh, bool keep_all) {
  if (keep_all || p.Wrec != nullptr) return p.T;
  for (int64_t t = p.T; t > 0; --t) {
    const S* xt = p.x + (b * p.T + t - 1) * p.Np;
    for (int64_t j = 0; j < p.Np; ++j)
      if (xt[j] != S(0)) return t;
    if (gh) {
      const S* gt = gh + (b * p.T + t - 1) * p.No;
      for (int64_t i = 0; i < p.No; ++i)
        if (gt[i] != S(0)) return t;
    }
  }
  return 0;
}

// One forward step of trial b, rows [r0, r1) of M (all by default; r0 a multiple of RB):
// Msrc = M_{t-1} -> Mdst = M_t (may alias), both holding row i at (i - r0) * Np. Writes h_t,
// g_t into the trial's (T, No) blocks h and g. A row's step reads no other row (W_rec aside),
// so rows split between threads give the same bits.
// IDLE: x_t is all zero and there is no W_rec (a padded step after the trial's end), so the
// dot product is skipped: with x_t = 0 it sums signed zeros to +0, and a = +0 + b as here.
// Everything else (tanh, the M update with its zero Hebbian term) runs as for any step.
constexpr int64_t RB = 16;  // rows per block of the forward step

template <typename S, bool MULT, bool KEEP, bool IDLE = false, bool BAND = false>
void fwd_step(const Prm<S>& p, int64_t b, int64_t t, const S* Msrc, S* Mdst, S* h, S* g,
              S* xe, S* rec, int64_t band0 = 0, int64_t band1 = 0) {
  const int64_t No = p.No, Np = p.Np;
  // all rows unless BAND (a separate instantiation: the row range as runtime values slowed
  // the all-rows step by ~10%)
  const int64_t r0 = BAND ? band0 : 0, re = BAND ? band1 : No;
  const S* xt = p.x + (b * p.T + t) * Np;
  for (int64_t j = 0; j < Np; ++j) xe[j] = p.ec[j] * xt[j];
  const bool has_rec = p.Wrec != nullptr && t > 0;
  if (has_rec) {
    const S* hp = h + (t - 1) * No;
    for (int64_t i = 0; i < No; ++i) {
      const S* wr = p.Wrec + i * No;
      S s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < No; ++k) s += wr[k] * hp[k];
      rec[i] = s;
    }
  }
  const S* keep = KEEP ? p.keep + b * p.keep_bs : nullptr;
  const S* mask = p.mask ? p.mask + b * No : nullptr;
  const S lo = p.lo, hi = p.hi;
  const S* lc = p.lc;
  // Rows in blocks of RB: the block's pre-activations, then its tanh as one vector loop,
  // then its M updates (each row's M is still in L1 from its dot product).
  S pre[RB], gv[RB];
  for (int64_t i0 = r0; i0 < re; i0 += RB) {
    const int64_t nb = std::min(RB, re - i0);
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t i = i0 + r;
      const S* Mr = Msrc + (i - r0) * Np;
      const S* Wr = p.W + i * Np;
      S s = 0;  // (W ⊙ (1 + M)) x  or  (W + M) x, never split: no cancellation in float32
      if (IDLE) {
      } else if (MULT) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < Np; ++j) s += Wr[j] * (S(1) + Mr[j]) * xt[j];
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < Np; ++j) s += (Wr[j] + Mr[j]) * xt[j];
      }
      S a = s + p.bias[i];
      if (has_rec) a += rec[i];
      pre[r] = a;
    }
#pragma omp simd
    for (int64_t r = 0; r < nb; ++r) gv[r] = tanh_vec(pre[r]);
    for (int64_t i = i0; i < i0 + nb; ++i) {
      const S* Mr = Msrc + (i - r0) * Np;
      S* Md = Mdst + (i - r0) * Np;
      const S gi = gv[i - i0];
      const S hv = mask ? gi * mask[i] : gi;
      g[t * No + i] = gi;
      h[t * No + i] = hv;
      const S pe = p.er[i] * (p.assoc ? hv : p.pc);
      const S li = p.lr[i];
      // with lc = 1, li * Mr[j] is li * lc[j] * Mr[j] bit for bit (tested)
      if (KEEP) {
        const S* kr = keep + i * Np;
        if (p.lc1) {
#pragma omp simd
          for (int64_t j = 0; j < Np; ++j) {
            S m = li * Mr[j] + pe * xe[j];
            m = std::min(std::max(m, lo), hi);
            Md[j] = m * kr[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < Np; ++j) {
            S m = li * lc[j] * Mr[j] + pe * xe[j];
            m = std::min(std::max(m, lo), hi);
            Md[j] = m * kr[j];
          }
        }
      } else if (p.lc1) {
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) {
          S m = li * Mr[j] + pe * xe[j];
          Md[j] = std::min(std::max(m, lo), hi);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) {
          S m = li * lc[j] * Mr[j] + pe * xe[j];
          Md[j] = std::min(std::max(m, lo), hi);
        }
      }
    }
  }
}

// Reverse pass 1 over one row: G̃ = G ⊙ inside(M̃) ⊙ keep in place; v += G̃ x̂; dlam += G̃ M;
// u += G̃ pe (x̂ = η column factor ⊙ x, pe = η row factor · post).
template <typename S, bool KEEP, bool STRICT, bool DLAM>
inline void pass1(int64_t Np, S* __restrict Gr, const S* __restrict Mr, const S* __restrict lc,
                  const S* __restrict xe, const S* __restrict kr, S li, S pe, S lo, S hi,
                  S* __restrict uu, S& v_out, S& dlam_out) {
  S v = 0, dlam = 0;
#pragma omp simd reduction(+ : v, dlam)
  for (int64_t j = 0; j < Np; ++j) {
    const S m = li * lc[j] * Mr[j] + pe * xe[j];
    const bool in = STRICT ? (m > lo && m < hi) : (m >= lo && m <= hi);
    S gt = in ? Gr[j] : S(0);
    if (KEEP) gt *= kr[j];
    Gr[j] = gt;
    v += gt * xe[j];
    if (DLAM) dlam += gt * Mr[j];
    uu[j] += gt * pe;
  }
  v_out = v;
  dlam_out = dlam;
}

// Threads of the kernel's own (std::thread, joined; nothing spins while it waits). Trials are
// handed out one at a time from a shared counter, so a thread that the OS deschedules on a
// busy machine holds back one trial, not a fixed half of the batch. Every trial's forward is
// independent of the others, so the result does not depend on which thread ran it.
template <typename F>
void on_threads(int64_t nthr, const F& work) {
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < nthr; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// M0: the M entering step 0 of every trial (B, No, Np), or nullptr for M = 0 (a trial's
// start). A sequence run in two calls, the second from the first's final M, gives the same
// h and M as one call.
template <typename S, bool MULT, bool KEEP>
void forward_impl(const Prm<S>& p, S* hout, S* Mout, const S* M0, int64_t nthr) {
  const int64_t NN = p.No * p.Np;
  std::atomic<int64_t> next(0);
  on_threads(std::min(nthr, p.B), [&]() {
    std::vector<S> g(p.T * p.No), xe(p.Np), rec(p.No);
    for (int64_t b = next++; b < p.B; b = next++) {
      S* M = Mout + b * NN;
      if (M0) std::memcpy(M, M0 + b * NN, NN * sizeof(S));
      else std::fill(M, M + NN, S(0));
      S* h = hout + b * p.T * p.No;
      const int64_t end = trial_end(p, b, static_cast<const S*>(nullptr), false);
      for (int64_t t = 0; t < end; ++t)
        fwd_step<S, MULT, KEEP>(p, b, t, M, M, h, g.data(), xe.data(), rec.data());
      for (int64_t t = end; t < p.T; ++t)
        fwd_step<S, MULT, KEEP, true>(p, b, t, M, M, h, g.data(), xe.data(), rec.data());
    }
  });
}


// One trial's recomputed forward: M at segment starts (ckpt), the segment's M_{t-1} history
// (Mp[t - t0] points into ckpt, hist or scratch), and g = tanh(a) of every step.
template <typename S>
struct Hist {
  std::vector<S> ckpt, hist, scratch, g, xe, rec;
  std::vector<S*> Mp;
  Hist(int64_t nseg, int64_t K, int64_t NN, int64_t T, int64_t No, int64_t Np)
      : ckpt(nseg * NN), hist((K - 1) * NN + 1), scratch(NN), g(T * No), xe(Np), rec(No),
        Mp(K + 1) {}
};

// The running sums over rows of one reverse step (dx's two terms and λ's column gradient),
// handed from the thread of one band of rows to the thread of the next, step after step.
// The next band continues the sums where the previous stopped, so they add the rows in the
// same order as one thread does. A ring of `slots` steps; both sides wait on a condition
// variable (never spinning) when it is empty or full.
template <typename S>
struct Link {
  const int64_t n, slots;  // n values per sum, three sums per step
  std::vector<S> buf;
  int64_t produced = 0, consumed = 0;  // steps handed over / taken, guarded by mu
  std::mutex mu;
  std::condition_variable cv;
  Link(int64_t n_, int64_t slots_) : n(n_), slots(slots_), buf(3 * n_ * slots_) {}
  template <typename F>
  void await(const F& ready) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, ready);
  }
  void advance(int64_t& counter, int64_t value) {
    {
      std::lock_guard<std::mutex> lk(mu);
      counter = value;
    }
    cv.notify_all();
  }
  void put(int64_t q, const S* a, const S* b, const S* c) {
    await([&] { return q - consumed < slots; });
    S* d = buf.data() + (q % slots) * 3 * n;
    std::copy(a, a + n, d);
    std::copy(b, b + n, d + n);
    std::copy(c, c + n, d + 2 * n);
    advance(produced, q + 1);
  }
  void take(int64_t q, S* a, S* b, S* c) {
    await([&] { return produced > q; });
    const S* d = buf.data() + (q % slots) * 3 * n;
    std::copy(d, d + n, a);
    std::copy(d + n, d + 2 * n, b);
    std::copy(d + 2 * n, d + 3 * n, c);
    advance(consumed, q + 1);
  }
};

// The reverse pass of rows [r0, r1) (a band; all rows by default) of one trial at a time.
// dL/dM (G, the band's rows) and the carried W_recᵀ δ live here across segments; the dW
// accumulator is one buffer that every trial adds into in trial order, so the sum is the
// same however the work is spread over threads. A band takes the row sums of each step
// from the band above (`in`) and hands them to the band below (`out`); the last band
// finishes the step (dx_t, η's and λ's column gradients).
template <typename S, bool MULT, bool KEEP, bool BAND = false>
struct Reverse {
  const Prm<S>& p;
  const BwdOut& o;
  const int64_t No, Np, T, NN, K, nseg, band0, band1, RN;
  std::vector<S> G, post, carry, dh, u, dxm, lamc, xe;
  const std::vector<int64_t>& end;  // per trial: steps t >= end[b] are skipped (trial_end)
  S* acc;
  Link<S>*in, *out;
  int64_t q = 0;  // steps reversed so far (the Link sequence number)
  Reverse(const Prm<S>& p_, const BwdOut& o_, const std::vector<int64_t>& end_,
          int64_t r0_ = 0, int64_t r1_ = -1, Link<S>* in_ = nullptr, Link<S>* out_ = nullptr)
      : p(p_), o(o_), No(p_.No), Np(p_.Np), T(p_.T), NN(p_.No * p_.Np), K(o_.seg),
        nseg((p_.T + o_.seg - 1) / o_.seg), band0(r0_), band1(r1_ < 0 ? p_.No : r1_),
        RN((band1 - band0) * p_.Np), G(RN), post(No), carry(No), dh(No), u(Np), dxm(Np), lamc(Np),
        xe(Np), end(end_), acc(o_.need_acc ? static_cast<S*>(o_.acc) : nullptr), in(in_),
        out(out_) {}

  S* hs(int64_t b) const { return static_cast<S*>(o.hs) + b * T * No; }

  // checkpoint pass: H.ckpt[s] = M entering segment s (M_{s K - 1}), for the segments that
  // start before the trial's end
  void checkpoints(int64_t b, Hist<S>& H) const {
    const int64_t r0 = BAND ? band0 : 0, r1 = BAND ? band1 : No;  // constants unless BAND
    std::fill(H.ckpt.begin(), H.ckpt.begin() + RN, S(0));
    for (int64_t s = 0; s + 1 < nseg && (s + 1) * K < end[b]; ++s) {
      S* Mc = H.ckpt.data() + (s + 1) * RN;
      std::memcpy(Mc, H.ckpt.data() + s * RN, RN * sizeof(S));
      for (int64_t t = s * K; t < (s + 1) * K; ++t)
        fwd_step<S, MULT, KEEP, false, BAND>(p, b, t, Mc, Mc, hs(b), H.g.data(), H.xe.data(),
                                             H.rec.data(), r0, r1);
    }
  }

  // recompute segment s from its checkpoint: H.Mp[t - t0] = M_{t-1}, up to the trial's end
  void recompute(int64_t b, int64_t s, Hist<S>& H) const {
    const int64_t r0 = BAND ? band0 : 0, r1 = BAND ? band1 : No;  // constants unless BAND
    const int64_t t0 = s * K, t1 = std::min({T, t0 + K, end[b]});
    if (nseg == 1) std::fill(H.ckpt.begin(), H.ckpt.begin() + RN, S(0));
    H.Mp[0] = H.ckpt.data() + s * RN;
    for (int64_t t = t0; t < t1; ++t) {
      S* dst = (t + 1 < t1) ? H.hist.data() + (t - t0) * RN : H.scratch.data();
      H.Mp[t - t0 + 1] = dst;
      fwd_step<S, MULT, KEEP, false, BAND>(p, b, t, H.Mp[t - t0], dst, hs(b), H.g.data(),
                                           H.xe.data(), H.rec.data(), r0, r1);
    }
  }

  void start(int64_t b) {
    const int64_t r0 = BAND ? band0 : 0, r1 = BAND ? band1 : No;  // constants unless BAND
    const S* gM = static_cast<const S*>(o.gM);
    if (gM) std::memcpy(G.data(), gM + b * NN + r0 * Np, RN * sizeof(S));
    else std::fill(G.begin(), G.end(), S(0));
    std::fill(carry.begin(), carry.end(), S(0));
    std::fill_n(static_cast<S*>(o.eta_r) + b * No + r0, r1 - r0, S(0));
    std::fill_n(static_cast<S*>(o.lam_r) + b * No + r0, r1 - r0, S(0));
    if (!(BAND && out)) {  // the last band finishes the column sums
      std::fill_n(static_cast<S*>(o.eta_c) + b * Np, Np, S(0));
      std::fill_n(static_cast<S*>(o.lam_c) + b * Np, Np, S(0));
    }
  }

  // walk back through segment s of trial b (recomputed into H); past the trial's end δ, dx
  // and h are 0 (h is only read for W_rec's gradient, and with W_rec nothing is skipped)
  void segment(int64_t b, int64_t s, const Hist<S>& H) {
    const int64_t r0 = BAND ? band0 : 0, r1 = BAND ? band1 : No;  // constants unless BAND
    const int64_t t0 = s * K, t1 = std::min({T, t0 + K, end[b]});
    for (int64_t t = std::max(t0, t1); t < std::min(T, t0 + K); ++t) {
      std::fill_n(static_cast<S*>(o.delta) + (b * T + t) * No + r0, r1 - r0, S(0));
      std::fill_n(hs(b) + t * No + r0, r1 - r0, S(0));
      if (o.need_x && !(BAND && out))
        std::fill_n(static_cast<S*>(o.dx) + (b * T + t) * Np, Np, S(0));
    }
    const S* gh = static_cast<const S*>(o.gh);
    const S* h = hs(b);
    const S* g = H.g.data();
    S* delta = static_cast<S*>(o.delta) + b * T * No;
    S* eta_r = static_cast<S*>(o.eta_r) + b * No;
    S* eta_c = static_cast<S*>(o.eta_c) + b * Np;
    S* lam_r = static_cast<S*>(o.lam_r) + b * No;
    S* lam_c = static_cast<S*>(o.lam_c) + b * Np;
    const S* keep = KEEP ? p.keep + b * p.keep_bs : nullptr;
    const S* mask = p.mask ? p.mask + b * No : nullptr;
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const S* Mprev = H.Mp[t - t0];
      const S* xt = p.x + (b * T + t) * Np;
      for (int64_t j = 0; j < Np; ++j) xe[j] = p.ec[j] * xt[j];
      for (int64_t i = r0; i < r1; ++i) {
        post[i] = p.assoc ? h[t * No + i] : p.pc;
        dh[i] = (gh ? gh[(b * T + t) * No + i] : S(0)) + carry[i];
      }
      if (BAND && in) {
        in->take(q, u.data(), dxm.data(), lamc.data());
      } else {
        std::fill(u.begin(), u.end(), S(0));
        if (o.need_x) std::fill(dxm.begin(), dxm.end(), S(0));
        if (o.need_lamc) std::fill(lamc.begin(), lamc.end(), S(0));
      }
      S* dl = delta + t * No;
      const S lo = p.lo, hi = p.hi;
      const S* lc = p.lc;
      S* uu = u.data();
      S* dxv = dxm.data();
      S* lcv = lamc.data();
      const bool strict = p.strict;
      for (int64_t i = r0; i < r1; ++i) {
        S* Gr = G.data() + (i - r0) * Np;
        const S* Mr = Mprev + (i - r0) * Np;
        const S* Wr = p.W + i * Np;
        const S pe = p.er[i] * post[i];
        const S li = p.lr[i];
        S v = 0, dlam = 0;
        // pass 1: G̃ (in place), G̃ x, G̃ ⊙ M_{t-1}, G̃ᵀ (η post)
        const S* kr = KEEP ? keep + i * Np : nullptr;
        S* xv = xe.data();
        if (strict && o.need_lam)
          pass1<S, KEEP, true, true>(Np, Gr, Mr, lc, xv, kr, li, pe, lo, hi, uu, v, dlam);
        else if (strict)
          pass1<S, KEEP, true, false>(Np, Gr, Mr, lc, xv, kr, li, pe, lo, hi, uu, v, dlam);
        else if (o.need_lam)
          pass1<S, KEEP, false, true>(Np, Gr, Mr, lc, xv, kr, li, pe, lo, hi, uu, v, dlam);
        else
          pass1<S, KEEP, false, false>(Np, Gr, Mr, lc, xv, kr, li, pe, lo, hi, uu, v, dlam);
        if (o.need_lamc) {
          for (int64_t j = 0; j < Np; ++j) lcv[j] += Gr[j] * Mr[j];
        }
        eta_r[i] += post[i] * v;
        lam_r[i] += dlam;
        const S gi = g[t * No + i];
        S d = (dh[i] + (p.assoc ? p.er[i] * v : S(0))) * (S(1) - gi * gi);
        if (mask) d *= mask[i];
        dl[i] = d;
        // pass 2: dW += δ xᵀ ⊙ (1 + M_{t-1}), dx += (W ⊙ (1 + M_{t-1}))ᵀ δ, and
        // G <- λ G̃ + W ⊙ δ xᵀ (the latter only for t > 0: there is no M_{-1} to feed)
        S* ar = acc ? acc + i * Np : nullptr;
        if (MULT && ar && o.need_x && t > 0) {  // training: one fused loop
#pragma omp simd
          for (int64_t j = 0; j < Np; ++j) {
            const S e = d * xt[j], w = Wr[j], om = S(1) + Mr[j];
            ar[j] += e * om;
            dxv[j] += w * om * d;
            Gr[j] = li * lc[j] * Gr[j] + e * w;
          }
        } else if (MULT) {
          if (ar) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) ar[j] += (d * xt[j]) * (S(1) + Mr[j]);
          }
          if (o.need_x) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) dxv[j] += Wr[j] * (S(1) + Mr[j]) * d;
          }
          if (t > 0) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j)
              Gr[j] = li * lc[j] * Gr[j] + (d * xt[j]) * Wr[j];
          }
        } else {
          if (ar) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) ar[j] += d * xt[j];
          }
          if (o.need_x) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) dxv[j] += (Wr[j] + Mr[j]) * d;
          }
          if (t > 0) {
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) Gr[j] = li * lc[j] * Gr[j] + d * xt[j];
          }
        }
      }
      if (BAND && out) {
        out->put(q++, uu, dxv, lcv);
        continue;
      }
      ++q;
      if (o.need_x) {
        S* dxt = static_cast<S*>(o.dx) + (b * T + t) * Np;
        for (int64_t j = 0; j < Np; ++j) dxt[j] = dxv[j] + p.ec[j] * uu[j];
      }
      for (int64_t j = 0; j < Np; ++j) eta_c[j] += xt[j] * uu[j];
      if (o.need_lamc)
        for (int64_t j = 0; j < Np; ++j) lam_c[j] += lcv[j];
      if (p.Wrec) {  // carry = W_recᵀ δ_t, for step t - 1
        std::fill(carry.begin(), carry.end(), S(0));
        for (int64_t i = 0; i < No; ++i) {
          const S d = dl[i];
          const S* wr = p.Wrec + i * No;
#pragma omp simd
          for (int64_t k = 0; k < No; ++k) carry[k] += wr[k] * d;
        }
      }
    }
  }
};

// One band's whole reverse pass: every trial in trial order, segment by segment.
template <typename S, bool MULT, bool KEEP, bool BAND>
void reverse_all(Reverse<S, MULT, KEEP, BAND>& R) {
  Hist<S> H(R.nseg, R.K, R.RN, R.T, R.No, R.Np);
  for (int64_t b = 0; b < R.p.B; ++b) {
    R.checkpoints(b, H);
    R.start(b);
    for (int64_t s = R.nseg - 1; s >= 0; --s) {
      R.recompute(b, s, H);
      R.segment(b, s, H);
    }
  }
}

// Trials are reversed one after another in trial order (the dW accumulator is one running
// sum, so its rounding is the same whatever the thread count). With more than one thread
// and no W_rec, the rows are split into bands (whole blocks of RB rows), one thread each:
// a row's forward and reverse recurrences read no other row, and the sums over rows (dx_t,
// η's and λ's column gradients) pass from band to band each step (Link), so every sum adds
// its terms in the order one thread does: bit-identical for any thread count. With W_rec
// (rows coupled through h_{t-1}) and a trial's whole history in one segment, a second thread
// recomputes trial b + 1's forward while trial b is reversed (one join per trial).
template <typename S, bool MULT, bool KEEP>
void backward_impl(const Prm<S>& p, const BwdOut& o, int64_t nthr) {
  std::vector<int64_t> end(p.B);
  for (int64_t b = 0; b < p.B; ++b)
    end[b] = trial_end(p, b, static_cast<const S*>(o.gh), o.gM != nullptr);
  const int64_t blocks = (p.No + RB - 1) / RB;
  const int64_t bands = p.Wrec ? 1 : std::min(nthr, blocks);
  if (bands > 1) {
    std::vector<std::unique_ptr<Link<S>>> links;
    for (int64_t k = 0; k + 1 < bands; ++k)
      links.emplace_back(new Link<S>(p.Np, 2 * p.T));
    std::vector<std::unique_ptr<Reverse<S, MULT, KEEP, true>>> rev;
    for (int64_t k = 0; k < bands; ++k) {
      const int64_t r0 = RB * (k * blocks / bands);
      const int64_t r1 = std::min(p.No, RB * ((k + 1) * blocks / bands));
      rev.emplace_back(new Reverse<S, MULT, KEEP, true>(p, o, end, r0, r1,
                                                  k ? links[k - 1].get() : nullptr,
                                                  k + 1 < bands ? links[k].get() : nullptr));
    }
    std::vector<std::thread> pool;
    for (int64_t k = 1; k < bands; ++k) pool.emplace_back([&, k]() { reverse_all(*rev[k]); });
    reverse_all(*rev[0]);
    for (auto& t : pool) t.join();
    return;
  }
  Reverse<S, MULT, KEEP> R(p, o, end);
  if (R.nseg == 1 && nthr > 1 && p.B > 1) {
    Hist<S> H0(1, R.K, R.RN, p.T, p.No, p.Np), H1(1, R.K, R.RN, p.T, p.No, p.Np);
    Hist<S>* H[2] = {&H0, &H1};
    R.recompute(0, 0, H0);
    for (int64_t b = 0; b < p.B; ++b) {
      std::thread next;
      if (b + 1 < p.B) next = std::thread([&, b]() { R.recompute(b + 1, 0, *H[(b + 1) % 2]); });
      R.start(b);
      R.segment(b, 0, *H[b % 2]);
      if (next.joinable()) next.join();
    }
    return;
  }
  reverse_all(R);
}

}  // namespace

namespace mpnk {

template <typename S>
void forward(const Prm<S>& p, bool mult, bool keep, S* h, S* M, const S* M0, int64_t threads) {
  if (mult && keep) forward_impl<S, true, true>(p, h, M, M0, threads);
  else if (mult) forward_impl<S, true, false>(p, h, M, M0, threads);
  else if (keep) forward_impl<S, false, true>(p, h, M, M0, threads);
  else forward_impl<S, false, false>(p, h, M, M0, threads);
}

template <typename S>
void backward(const Prm<S>& p, bool mult, bool keep, const BwdOut& o, int64_t threads) {
  if (mult && keep) backward_impl<S, true, true>(p, o, threads);
  else if (mult) backward_impl<S, true, false>(p, o, threads);
  else if (keep) backward_impl<S, false, true>(p, o, threads);
  else backward_impl<S, false, false>(p, o, threads);
}

template void forward<float>(const Prm<float>&, bool, bool, float*, float*, const float*,
                             int64_t);
template void forward<double>(const Prm<double>&, bool, bool, double*, double*, const double*,
                              int64_t);
template void backward<float>(const Prm<float>&, bool, bool, const BwdOut&, int64_t);
template void backward<double>(const Prm<double>&, bool, bool, const BwdOut&, int64_t);

}  // namespace mpnk
