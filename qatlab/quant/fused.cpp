// qatlab's per-tensor LSQ fake quantizer on the CPU as one C++ autograd Function: one loop
// forward (read x, write q) and one loop backward (read g and x, write dx, and reduce the two
// sums of the step gradient), vectorised by the compiler. Built on first use by
// qatlab/quant/fused.py (torch.utils.cpp_extension); values as the ATen passes of
// qatlab/quant/quantizer.py's _FakeQuant: q and dx bitwise equal, the step gradient's sums in
// another order (16 float lanes over 1,024 elements, then double; the same for any number of
// threads). Float32, contiguous, CPU only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

static constexpr int64_t GRAIN = 1 << 16;  // elements per task of at::parallel_for
static constexpr int LANES = 16;           // float accumulators per sum (vector lanes)
static constexpr int64_t FLUSH = 1 << 10;  // elements per lane-sum before it goes to double

static double inverse(double s) {
  return s != 0 ? 1.0 / s : std::copysign(std::numeric_limits<double>::infinity(), s);
}

// the loops take their pointers as __restrict arguments (a lambda's captures would not let gcc
// vectorise them: it cannot rule out that o aliases x)
static void fwd_range(const float* __restrict x, float* __restrict o, int64_t b, int64_t e,
                      float fi, float fs, float fn, float fp) {
  for (int64_t i = b; i < e; ++i) {
    float v = std::nearbyint(x[i] * fi);
    v = v < fn ? fn : v;
    v = v > fp ? fp : v;
    o[i] = v * fs;
  }
}

struct BwdArgs {
  float fi, fn, fp, lo, hi;
};

// One element of backward: dx (returned) and the two sums' terms g*level and dx*x.
static inline float bwd_one(float xv, float gv, const BwdArgs& a, float& levels, float& inner) {
  float v = std::nearbyint(xv * a.fi);
  v = v < a.fn ? a.fn : v;
  v = v > a.fp ? a.fp : v;
  const float gi = (xv > a.lo && xv < a.hi) ? gv : 0.f;
  levels += gv * v;
  inner += gi * xv;
  return gi;
}

// dx over [b, e) and the two sums of the step gradient: LANES float sums over FLUSH elements,
// then double. In place (dx over g, which backward owns) writes through g itself, so the loop
// still has one pointer per array and vectorises.
template <bool InPlace>
static void bwd_range(float* g, const float* __restrict x, float* __restrict o, int64_t b,
                      int64_t e, const BwdArgs& a, double* sum1, double* sum2) {
  float* dst = InPlace ? g : o;
  double t1 = 0, t2 = 0;
  int64_t i = b;
  while (i + LANES <= e) {
    float a1[LANES] = {0}, a2[LANES] = {0};
    const int64_t stop = std::min(e, i + FLUSH);
    for (; i + LANES <= stop; i += LANES) {
      for (int j = 0; j < LANES; ++j) {
        dst[i + j] = bwd_one(x[i + j], g[i + j], a, a1[j], a2[j]);
      }
    }
    for (int j = 0; j < LANES; ++j) { t1 += a1[j]; t2 += a2[j]; }
  }
  for (; i < e; ++i) {
    float l = 0, n = 0;
    dst[i] = bwd_one(x[i], g[i], a, l, n);
    t1 += l;
    t2 += n;
  }
  *sum1 = t1;
  *sum2 = t2;
}

// Per chunk of GRAIN elements (threads split by chunk), the chunks' sums added in order: the
// same result for any number of threads.
static void fq_bwd(float* g, const float* x, float* o, int64_t N, const BwdArgs& a,
                   double* out1, double* out2) {
  const int64_t chunks = (N + GRAIN - 1) / GRAIN;
  std::vector<double> s1(chunks, 0.0), s2(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * GRAIN, e = std::min(N, b + GRAIN);
      if (o == g) {
        bwd_range<true>(g, x, nullptr, b, e, a, &s1[c], &s2[c]);
      } else {
        bwd_range<false>(g, x, o, b, e, a, &s1[c], &s2[c]);
      }
    }
  });
  double t1 = 0, t2 = 0;
  for (int64_t c = 0; c < chunks; ++c) { t1 += s1[c]; t2 += s2[c]; }
  *out1 = t1;
  *out2 = t2;
}

struct FakeQuantize : public torch::autograd::Function<FakeQuantize> {
  // floor NaN: none; else the step is clamped to at least float32(floor) and, held there (or
  // NaN), gets a zero gradient, as step.clamp_min(floor) would
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor step, int64_t n, int64_t p,
                        double grad_scale, double floor) {
    double s = step.item<double>();
    bool held = false;
    if (!std::isnan(floor) && !(s >= (double)(float)floor)) {
      held = true;
      if (s == s) s = (double)(float)floor;
    }
    auto out = at::empty_like(x);
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float fi = (float)inverse(s), fs = (float)s, fn = (float)n, fp = (float)p;
    at::parallel_for(0, x.numel(), GRAIN, [&](int64_t b, int64_t e) {
      fwd_range(xp, op, b, e, fi, fs, fn, fp);
    });
    ctx->save_for_backward({x, step, out});  // out: the next layer's input (no extra memory)
    ctx->saved_data["s"] = s;
    ctx->saved_data["n"] = n;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->saved_data["held"] = held;
    return out;
  }

  // grads by reference, so that backward can take the gradient's only reference and write dx
  // over it (as AccumulateGrad steals a gradient it alone holds)
  static tensor_list backward(AutogradContext* ctx, tensor_list& grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], step = saved[1], out = saved[2];
    const double s = ctx->saved_data["s"].toDouble();
    const double scale = ctx->saved_data["grad_scale"].toDouble() / s;
    const int64_t n = ctx->saved_data["n"].toInt(), p = ctx->saved_data["p"].toInt();
    const bool held = ctx->saved_data["held"].toBool();
    const double lo = (n - 0.5) * s, hi = (p + 0.5) * s;
    Tensor g = std::move(grads[0]);  // grads[0] let go: now g may be the only reference
    if (!g.is_contiguous()) g = g.contiguous();
    Tensor grad_x, grad_step;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph: _FakeQuant's ATen ops, differentiable (also through the saved output)
      grad_x = at::hardtanh_backward(g, x, lo, hi);
      if (ctx->needs_input_grad(1) && !held) {
        grad_step = (at::dot(g.reshape(-1), out.reshape(-1)) -
                     at::dot(grad_x.reshape(-1), x.reshape(-1))) * scale;
      }
    } else {
      // no one else can see g (one reference, its own storage): dx goes over it
      const bool own = g.use_count() == 1 && g.storage().use_count() == 1;
      grad_x = own ? g : at::empty_like(x);
      const BwdArgs args{(float)inverse(s), (float)n, (float)p, (float)lo, (float)hi};
      double levels_sum = 0, inner = 0;
      fq_bwd(g.data_ptr<float>(), x.data_ptr<float>(), grad_x.data_ptr<float>(), x.numel(),
             args, &levels_sum, &inner);
      if (ctx->needs_input_grad(1) && !held) {
        grad_step = at::full_like(step, (levels_sum * s - inner) * scale);
      }
    }
    if (ctx->needs_input_grad(1) && held) grad_step = at::zeros_like(step);
    if (!ctx->needs_input_grad(0)) grad_x = Tensor();
    return {grad_x, grad_step, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor fake_quantize(Tensor x, Tensor step, int64_t n, int64_t p, double grad_scale,
                     double floor) {
  return FakeQuantize::apply(x, step, n, p, grad_scale, floor);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quantize", &fake_quantize, "LSQ fake quantization, per tensor, CPU float32");
}
