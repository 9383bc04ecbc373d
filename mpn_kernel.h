// Shared by mpn_kernel.cpp and mpn_binding.cpp, the compiled CPU kernel of the plastic layer
// (engine "cpp"; design, threads and measurements in mpn_cpp.py's docstring).
#pragma once

#include <cstdint>

// What the two translation units share: the kernel's parameters, its backward's outputs and
// its two entry points (defined, for float and double, in kernel.cpp).
namespace mpnk {

template <typename S>
struct Prm {
  int64_t B, T, No, Np;
  const S *x, *W, *bias, *er, *ec, *lr, *lc, *Wrec, *mask, *keep;
  int64_t keep_bs;   // trial stride of keep (0: shared)
  bool assoc, strict;
  bool lc1;          // λ's column factor is all ones (scalar or per-post λ): one multiply less
  S lo, hi, pc;
};

struct BwdOut {
  void *gh, *gM, *delta, *dx, *acc, *hs, *eta_r, *eta_c, *lam_r, *lam_c;
  bool need_x, need_acc, need_lamc, need_lam;
  int64_t seg;
};

template <typename S>
void forward(const Prm<S>& p, bool mult, bool keep, S* h, S* M, const S* M0, int64_t threads);
template <typename S>
void backward(const Prm<S>& p, bool mult, bool keep, const BwdOut& o, int64_t threads);

}  // namespace mpnk
