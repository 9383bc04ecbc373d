// The torch/pybind11 binding of mpn_kernel.cpp: tensors in, raw pointers to the kernel,
// tensors out (built by mpn_cpp.py).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "mpn_kernel.h"

namespace {

using mpnk::BwdOut;
using mpnk::Prm;

template <typename S>
Prm<S> make_prm(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias,
                const at::Tensor& er, const at::Tensor& ec, const at::Tensor& lr,
                const at::Tensor& lc, const c10::optional<at::Tensor>& Wrec,
                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& keep,
                int64_t keep_bs, bool assoc, bool strict, double lo, double hi) {
  Prm<S> p;
  p.B = x.size(0); p.T = x.size(1); p.Np = x.size(2); p.No = W.size(0);
  p.x = x.data_ptr<S>(); p.W = W.data_ptr<S>(); p.bias = bias.data_ptr<S>();
  p.er = er.data_ptr<S>(); p.ec = ec.data_ptr<S>(); p.lr = lr.data_ptr<S>();
  p.lc = lc.data_ptr<S>();
  p.Wrec = Wrec.has_value() ? Wrec->data_ptr<S>() : nullptr;
  p.mask = mask.has_value() ? mask->data_ptr<S>() : nullptr;
  p.keep = keep.has_value() ? keep->data_ptr<S>() : nullptr;
  p.keep_bs = keep_bs; p.assoc = assoc; p.strict = strict;
  p.lc1 = std::all_of(p.lc, p.lc + p.Np, [](S v) { return v == S(1); });
  p.lo = static_cast<S>(lo); p.hi = static_cast<S>(hi);
  p.pc = static_cast<S>(1.0 / std::sqrt(static_cast<double>(p.No)));
  return p;
}

}  // namespace

std::vector<at::Tensor> mpn_forward(at::Tensor x, at::Tensor W, at::Tensor bias, at::Tensor er,
                                    at::Tensor ec, at::Tensor lr, at::Tensor lc,
                                    c10::optional<at::Tensor> Wrec,
                                    c10::optional<at::Tensor> mask,
                                    c10::optional<at::Tensor> keep, int64_t keep_bs, bool mult,
                                    bool assoc, bool strict, double lo, double hi,
                                    int64_t threads, c10::optional<at::Tensor> M0) {
  auto h = at::empty({x.size(0), x.size(1), W.size(0)}, x.options());
  auto M = at::empty({x.size(0), W.size(0), W.size(1)}, x.options());
  const bool k = keep.has_value();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mpn_forward", [&] {
    auto p = make_prm<scalar_t>(x, W, bias, er, ec, lr, lc, Wrec, mask, keep, keep_bs, assoc,
                                strict, lo, hi);
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* Mp = M.data_ptr<scalar_t>();
    const scalar_t* m0 = M0.has_value() ? M0->data_ptr<scalar_t>() : nullptr;
    mpnk::forward<scalar_t>(p, mult, k, hp, Mp, m0, threads);
  });
  return {h, M};
}

// Returns delta (B,T,No), dx (B,T,Np), dW (1,No,Np), hs (B,T,No),
// eta_r (B,No), eta_c (B,Np), lam_r (B,No), lam_c (B,Np).
std::vector<at::Tensor> mpn_backward(at::Tensor x, at::Tensor W, at::Tensor bias, at::Tensor er,
                                     at::Tensor ec, at::Tensor lr, at::Tensor lc,
                                     c10::optional<at::Tensor> Wrec,
                                     c10::optional<at::Tensor> mask,
                                     c10::optional<at::Tensor> keep, int64_t keep_bs, bool mult,
                                     bool assoc, bool strict, double lo, double hi,
                                     c10::optional<at::Tensor> gh, c10::optional<at::Tensor> gM,
                                     bool need_x, bool need_acc, bool need_lam, bool need_lamc,
                                     int64_t seg, int64_t threads) {
  const int64_t B = x.size(0), T = x.size(1), Np = x.size(2), No = W.size(0);
  auto o = x.options();
  auto delta = at::empty({B, T, No}, o);
  auto dx = need_x ? at::empty({B, T, Np}, o) : at::empty({0}, o);
  auto acc = need_acc ? at::zeros({1, No, Np}, o) : at::empty({0}, o);
  auto hs = at::empty({B, T, No}, o);
  auto eta_r = at::empty({B, No}, o), eta_c = at::empty({B, Np}, o);
  auto lam_r = at::empty({B, No}, o), lam_c = at::empty({B, Np}, o);
  const bool k = keep.has_value();
  seg = std::max<int64_t>(1, std::min(seg, T));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mpn_backward", [&] {
    auto p = make_prm<scalar_t>(x, W, bias, er, ec, lr, lc, Wrec, mask, keep, keep_bs, assoc,
                                strict, lo, hi);
    BwdOut out;
    out.gh = gh.has_value() ? gh->data_ptr<scalar_t>() : nullptr;
    out.gM = gM.has_value() ? gM->data_ptr<scalar_t>() : nullptr;
    out.delta = delta.data_ptr<scalar_t>();
    out.dx = need_x ? dx.data_ptr<scalar_t>() : nullptr;
    out.acc = need_acc ? acc.data_ptr<scalar_t>() : nullptr;
    out.hs = hs.data_ptr<scalar_t>();
    out.eta_r = eta_r.data_ptr<scalar_t>(); out.eta_c = eta_c.data_ptr<scalar_t>();
    out.lam_r = lam_r.data_ptr<scalar_t>(); out.lam_c = lam_c.data_ptr<scalar_t>();
    out.need_x = need_x; out.need_acc = need_acc; out.need_lamc = need_lamc;
    out.need_lam = need_lam;
    out.seg = seg;
    mpnk::backward<scalar_t>(p, mult, k, out, threads);
  });
  return {delta, dx, acc, hs, eta_r, eta_c, lam_r, lam_c};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {  // the GIL is released while a kernel runs
  m.def("mpn_forward", &mpn_forward, py::call_guard<py::gil_scoped_release>());
  m.def("mpn_backward", &mpn_backward, py::call_guard<py::gil_scoped_release>());
}
