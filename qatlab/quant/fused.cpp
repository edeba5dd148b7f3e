// qatlab's per-tensor LSQ fake quantizer on the CPU as one C++ autograd Function: one loop
// forward (read x, write q) and one loop backward (read g and x, write dx, and reduce the two
// sums of the step gradient), vectorised by the compiler. Built on first use by
// qatlab/quant/fused.py (torch.utils.cpp_extension); values as the ATen passes of
// qatlab/quant/quantizer.py's _FakeQuant: q and dx bitwise equal, the step gradient's sums in
// another order (per-lane float, per-chunk double). Float32, contiguous, CPU only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

static constexpr int64_t GRAIN = 1 << 16;
// From this many elements ("large"): the loops use threads (at::parallel_for) and backward
// reduces the step gradient's two sums in its loop (one pass over g and x instead of three;
// float rounding differs). Below, backward takes the sums as _FakeQuant does (at::dot), so
// every value is bitwise equal to the ATen passes.
static int64_t large_from = 1 << 20;

void set_large_from(int64_t numel) { large_from = numel; }

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

static void fq_fwd(const float* x, float* o, int64_t N, float fi, float fs, float fn, float fp) {
  if (N < large_from) return fwd_range(x, o, 0, N, fi, fs, fn, fp);
  at::parallel_for(0, N, GRAIN, [&](int64_t b, int64_t e) {
    fwd_range(x, o, b, e, fi, fs, fn, fp);
  });
}

// dx over [b, e) and the two sums of the step gradient (per-lane float, then double)
static void bwd_range(const float* __restrict g, const float* __restrict x, float* __restrict o,
                      int64_t b, int64_t e, float fi, float fn, float fp, float lo, float hi,
                      double* sum1, double* sum2) {
  float a1[16] = {0}, a2[16] = {0};
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    for (int j = 0; j < 16; ++j) {
      const float xv = x[i + j], gv = g[i + j];
      float v = std::nearbyint(xv * fi);
      v = v < fn ? fn : v;
      v = v > fp ? fp : v;
      const float gi = (xv > lo && xv < hi) ? gv : 0.f;
      o[i + j] = gi;
      a1[j] += gv * v;
      a2[j] += gi * xv;
    }
  }
  double t1 = 0, t2 = 0;
  for (; i < e; ++i) {
    const float xv = x[i], gv = g[i];
    float v = std::nearbyint(xv * fi);
    v = v < fn ? fn : v;
    v = v > fp ? fp : v;
    const float gi = (xv > lo && xv < hi) ? gv : 0.f;
    o[i] = gi;
    t1 += gv * v;
    t2 += gi * xv;
  }
  for (int j = 0; j < 16; ++j) { t1 += a1[j]; t2 += a2[j]; }
  *sum1 = t1;
  *sum2 = t2;
}

static void fq_bwd(const float* g, const float* x, float* o, int64_t N, float fi, float fn,
                   float fp, float lo, float hi, double* out1, double* out2) {
  const int64_t chunks = (N + GRAIN - 1) / GRAIN;
  std::vector<double> s1(chunks, 0.0), s2(chunks, 0.0);
  auto chunk = [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * GRAIN, e = std::min(N, b + GRAIN);
      bwd_range(g, x, o, b, e, fi, fn, fp, lo, hi, &s1[c], &s2[c]);
    }
  };
  at::parallel_for(0, chunks, 1, chunk);  // called for large tensors only
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
    fq_fwd(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), (float)inverse(s), (float)s,
           (float)n, (float)p);
    ctx->save_for_backward({x, step, out});  // out: the next layer's input (no extra memory)
    ctx->saved_data["s"] = s;
    ctx->saved_data["n"] = n;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->saved_data["held"] = held;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], step = saved[1], out = saved[2];
    const double s = ctx->saved_data["s"].toDouble();
    const double scale = ctx->saved_data["grad_scale"].toDouble() / s;
    const int64_t n = ctx->saved_data["n"].toInt(), p = ctx->saved_data["p"].toInt();
    const bool held = ctx->saved_data["held"].toBool();
    const double lo = (n - 0.5) * s, hi = (p + 0.5) * s;
    auto g = grads[0].contiguous();
    Tensor grad_x, grad_step;
    if (torch::autograd::GradMode::is_enabled() || x.numel() < large_from) {
      // _FakeQuant's ATen ops: bitwise its values, and differentiable under create_graph
      // (also through the saved output)
      grad_x = at::hardtanh_backward(g, x, lo, hi);
      if (ctx->needs_input_grad(1) && !held) {
        auto outer = at::dot(g.reshape(-1), out.reshape(-1));
        auto inner = at::dot(grad_x.reshape(-1), x.reshape(-1));
        if (torch::autograd::GradMode::is_enabled()) {
          grad_step = (outer - inner) * scale;
        } else {
          grad_step = outer.sub_(inner).mul_(scale);
        }
      }
    } else {
      grad_x = at::empty_like(x);
      double levels_sum = 0, inner = 0;
      fq_bwd(g.data_ptr<float>(), x.data_ptr<float>(), grad_x.data_ptr<float>(), x.numel(),
             (float)inverse(s), (float)n, (float)p, (float)lo, (float)hi, &levels_sum, &inner);
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
  m.def("set_large_from", &set_large_from, "threads and in-loop sums from this many elements");
}
