// The rational-quadratic spline of models/maf.py (rq_spline) and its gradient, fused: one
// loop over every (member, event, feature) element, all bins of a spline in registers.
//
// The torch path runs ~40 whole-tensor operations per transform forward and ~60 backward on
// (members x events x features x bins) tensors; at the OnlineFlow's sizes each costs more in
// dispatch and memory traffic than in arithmetic. Here a spline is a few hundred flops on
// data that fits in L1, and the forward pass leaves the softmax for the backward pass.
//
// Layout (as models/maf.py): x (R, F) and params (R, F*(3K-1)) contiguous, R rows; params
// grouped by kind: widths [f*K + k], heights [F*K + f*K + k], interior derivatives
// [2*F*K + f*(K-1) + j]. float32 tensors are computed in float, float64 in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr int kMaxBins = 64;
constexpr double kMinBinWidth = 1e-3;  // nflows' defaults, as in models/maf.py
constexpr double kMinBinHeight = 1e-3;
constexpr double kMinDerivative = 1e-3;

// exp for x <= 0 in float: Cephes' expf polynomial after reduction by ln 2 (|error| ~1e-7
// relative), in arithmetic the compiler vectorises, unlike calls to std::exp. Below -87
// (exp < 1.6e-38, a softmax term that cannot matter) it returns exp(-87).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const int n = static_cast<int>(x * 1.44269504088896341f - 0.5f);  // round to nearest
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// exp of n values <= 0 in place. For float32 tensors by the float polynomial above (relative
// error ~1e-7, below what float32 inputs resolve) in one loop the compiler vectorises, cloned
// for AVX2 and picked at load time, so the library stays portable across x86-64 hosts; for
// float64 tensors by std::exp, exact to double precision.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void exp_in_place_float(double* v, int n) {
  for (int j = 0; j < n; ++j) v[j] = static_cast<double>(exp_nonpositive(static_cast<float>(v[j])));
}

template <typename T>
void exp_in_place(double* v, int n) {
  if constexpr (std::is_same_v<T, float>) {
    exp_in_place_float(v, n);
  } else {
    for (int j = 0; j < n; ++j) v[j] = std::exp(v[j]);
  }
}

// d = min + softplus(v) (torch's: beta 1, threshold 20) and its slope, sigmoid(v).
template <typename C>
void derivative(C v, C* d, C* slope) {
  if (v > C(20)) {
    *d = C(kMinDerivative) + v;
    *slope = C(1) / (C(1) + std::exp(-v));
    return;
  }
  const C e = std::exp(v);
  *d = C(kMinDerivative) + std::log(C(1) + e);  // log1p: ~4x slower, |difference| < 1e-7
  *slope = e / (C(1) + e);
}

// Softmax of every (kind, feature) group of K in the first 2·F·K params of a row: the
// width and then the height probabilities, in the params' layout.
template <typename T, typename C>
void row_probs(const T* row, int groups, int k, C* probs) {
  for (int g = 0; g < groups; ++g) {
    const T* in = row + g * k;
    C* out = probs + g * k;
    C top = static_cast<C>(in[0]);
    for (int b = 1; b < k; ++b) top = std::max(top, static_cast<C>(in[b]));
    for (int b = 0; b < k; ++b) out[b] = static_cast<C>(in[b]) - top;
  }
  exp_in_place<T>(probs, groups * k);
  for (int g = 0; g < groups; ++g) {
    C* out = probs + g * k;
    C sum = 0;
    for (int b = 0; b < k; ++b) sum += out[b];
    const C inverse = C(1) / sum;
    for (int b = 0; b < k; ++b) out[b] *= inverse;
  }
}

// The bin of u (interval units) and its knots: x0, width, y0, height.
template <typename C>
int bin_of(C u, const C* width_probs, const C* height_probs, int k, C* x0, C* w, C* y0, C* h) {
  const C width_scale = C(1 - kMinBinWidth * k), height_scale = C(1 - kMinBinHeight * k);
  C x_left = 0, y_left = 0;
  int idx = 0;
  for (; idx < k - 1; ++idx) {  // knot idx+1 = knot idx + the size of bin idx
    const C x_right = x_left + C(kMinBinWidth) + width_scale * width_probs[idx];
    if (!(u >= x_right)) break;
    x_left = x_right;
    y_left = y_left + C(kMinBinHeight) + height_scale * height_probs[idx];
  }
  *x0 = x_left;
  *y0 = y_left;
  const C x_right =
      idx == k - 1 ? C(1) : x_left + C(kMinBinWidth) + width_scale * width_probs[idx];
  const C y_right =
      idx == k - 1 ? C(1) : y_left + C(kMinBinHeight) + height_scale * height_probs[idx];
  *w = x_right - x_left;
  *h = y_right - y_left;
  return idx;
}

// Workspace per row: the 2·F·K probabilities, then per feature d0, d1 and the sigmoids of
// their unnormalised values (0 where a derivative is a fixed end, 1).
inline int64_t workspace_width(int n_features, int k) { return n_features * (2 * k + 4); }

template <typename T, typename C>
void forward(const T* xs, const T* ps, T* ys, T* ls, C* ws, int64_t rows, int n_features, int k,
             C bound) {
  const int64_t width = static_cast<int64_t>(n_features) * (3 * k - 1);
  const int fk = n_features * k;
  const int64_t ws_width = workspace_width(n_features, k);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = ps + r * width;
    C* probs = ws + r * ws_width;
    C* aux = probs + 2 * fk;
    row_probs(row, 2 * n_features, k, probs);
    for (int f = 0; f < n_features; ++f) {
      const int64_t i = r * n_features + f;
      const C xv = static_cast<C>(xs[i]);
      C* a = aux + 4 * f;
      if (!(xv >= -bound && xv <= bound)) {  // linear tails (and NaN passes through)
        ys[i] = xs[i];
        ls[i] = 0;
        a[0] = a[1] = 1;
        a[2] = a[3] = 0;
        continue;
      }
      const C u = (xv + bound) / (2 * bound);
      C x0, w, y0, h;
      const int idx = bin_of(u, probs + f * k, probs + fk + f * k, k, &x0, &w, &y0, &h);
      const T* du = row + 2 * fk + f * (k - 1);
      C d0 = 1, d1 = 1, s0 = 0, s1 = 0;  // ends: derivative 1, fixed
      if (idx >= 1) derivative(static_cast<C>(du[idx - 1]), &d0, &s0);
      if (idx <= k - 2) derivative(static_cast<C>(du[idx]), &d1, &s1);
      a[0] = d0;
      a[1] = d1;
      a[2] = s0;
      a[3] = s1;
      // Divisions are most of the arithmetic's time: one reciprocal each, then products.
      const C inv_w = C(1) / w;
      const C sl = h * inv_w, theta = (u - x0) * inv_w, t1 = theta * (1 - theta);
      const C inv_den = C(1) / (sl + (d0 + d1 - 2 * sl) * t1);
      const C numerator = sl * theta * theta + d0 * t1;
      const C shape = d1 * theta * theta + 2 * sl * t1 + d0 * (1 - theta) * (1 - theta);
      ys[i] = static_cast<T>(2 * bound * (y0 + h * numerator * inv_den) - bound);
      ls[i] = static_cast<T>(std::log(sl * sl * shape * inv_den * inv_den));
    }
  }
}

// Gradients of x and params given those of y and log_det (the forward's outputs), from the
// forward's workspace; gps must be zero on entry (an element writes only its spline's bins).
template <typename T, typename C>
void backward(const T* xs, const C* ws, const T* gys, const T* gls, T* gxs, T* gps,
              int64_t rows, int n_features, int k, C bound) {
  const int64_t width = static_cast<int64_t>(n_features) * (3 * k - 1);
  const int fk = n_features * k;
  const int64_t ws_width = workspace_width(n_features, k);
  C g_sizes[kMaxBins];
  for (int64_t r = 0; r < rows; ++r) {
    const C* probs = ws + r * ws_width;
    const C* aux = probs + 2 * fk;
    T* g_row = gps + r * width;
    for (int f = 0; f < n_features; ++f) {
      const int64_t i = r * n_features + f;
      const C xv = static_cast<C>(xs[i]);
      if (!(xv >= -bound && xv <= bound)) {  // identity: params get no gradient
        gxs[i] = gys[i];
        continue;
      }
      const C u = (xv + bound) / (2 * bound);
      const C* width_probs = probs + f * k;
      const C* height_probs = probs + fk + f * k;
      C x0, w, y0, h;
      const int idx = bin_of(u, width_probs, height_probs, k, &x0, &w, &y0, &h);
      const C* a_ = aux + 4 * f;
      const C d0 = a_[0], d1 = a_[1];
      const C inv_w = C(1) / w;
      const C sl = h * inv_w, theta = (u - x0) * inv_w, t1 = theta * (1 - theta);
      const C c = d0 + d1 - 2 * sl;
      const C inv_den = C(1) / (sl + c * t1);
      const C a = sl * theta * theta + d0 * t1;
      const C inv_m = C(1) / (d1 * theta * theta + 2 * sl * t1 + d0 * (1 - theta) * (1 - theta));
      // y = 2B·y_unit - B and u = (x + B) / 2B: gradients in interval units
      const C gy = 2 * bound * static_cast<C>(gys[i]);
      const C gl = static_cast<C>(gls[i]);
      const C g_a = gy * h * inv_den;
      const C g_den = -(g_a * a + 2 * gl) * inv_den;
      const C one_minus_2theta = 1 - 2 * theta;
      const C gl_m = gl * inv_m;
      const C g_theta = g_a * (2 * sl * theta + d0 * one_minus_2theta) +
                        g_den * c * one_minus_2theta +
                        2 * gl_m * (d1 * theta + sl * one_minus_2theta - d0 * (1 - theta));
      const C g_s = g_a * theta * theta + g_den * (1 - 2 * t1) + 2 * gl * w / h + 2 * t1 * gl_m;
      const C g_d0 = (g_a + g_den) * t1 + gl_m * (1 - theta) * (1 - theta);
      const C g_d1 = g_den * t1 + gl_m * theta * theta;
      const C g_h = gy * a * inv_den + g_s * inv_w;
      const C g_w = -(g_s * sl + g_theta * theta) * inv_w;
      gxs[i] = static_cast<T>(g_theta * inv_w / (2 * bound));
      const bool last = idx == k - 1;  // knot K is fixed at 1
      const C g_x0 = -g_theta / w - g_w, g_x1 = last ? C(0) : g_w;
      const C g_y0 = gy - g_h, g_y1 = last ? C(0) : g_h;
      // knot j = sum of the sizes left of it; sizes = min + scale·softmax(unnormalised)
      for (int pass = 0; pass < 2; ++pass) {
        const C* p = pass == 0 ? width_probs : height_probs;
        const C scale = C(1 - (pass == 0 ? kMinBinWidth : kMinBinHeight) * k);
        const C g_left = scale * (pass == 0 ? g_x0 + g_x1 : g_y0 + g_y1);
        const C g_right = scale * (pass == 0 ? g_x1 : g_y1);
        C dot = 0;
        for (int b = 0; b < k; ++b) {
          g_sizes[b] = b < idx ? g_left : (b == idx ? g_right : C(0));
          dot += p[b] * g_sizes[b];
        }
        T* out = g_row + pass * fk + f * k;
        for (int b = 0; b < k; ++b) out[b] = static_cast<T>(p[b] * (g_sizes[b] - dot));
      }
      // interior derivative j is knot j+1's: d0 when j + 1 == idx, d1 when j == idx
      T* g_du = g_row + 2 * fk + f * (k - 1);
      if (idx >= 1) g_du[idx - 1] = static_cast<T>(a_[2] * g_d0);
      if (idx <= k - 2) g_du[idx] = static_cast<T>(a_[3] * g_d1);
    }
  }
}

}  // namespace

// The C entry points (ctypes): f32 (arithmetic in float) and f64 (in double). The workspace
// (rows x F·(2K+4), the entry's dtype) carries the forward's softmax and derivatives to the
// backward. Return 0, or -1 if n_bins is out of range.
extern "C" {

int trigfarm_spline_max_bins() { return kMaxBins; }

int64_t trigfarm_spline_workspace_width(int n_features, int n_bins) {
  return workspace_width(n_features, n_bins);
}

#define TRIGFARM_SPLINE_ENTRIES(T, SUFFIX)                                                    \
  int trigfarm_spline_forward_##SUFFIX(const T* x, const T* params, T* y, T* log_det,       \
                                       double* workspace, int64_t rows, int n_features,      \
                                       int n_bins, double bound) {                           \
    if (n_bins < 2 || n_bins > kMaxBins) return -1;                                          \
    forward<T, double>(x, params, y, log_det, workspace, rows, n_features, n_bins, bound);                                                    \
    return 0;                                                                                \
  }                                                                                          \
  int trigfarm_spline_backward_##SUFFIX(const T* x, const double* workspace, const T* grad_y,    \
                                        const T* grad_log_det, T* grad_x, T* grad_params,    \
                                        int64_t rows, int n_features, int n_bins,            \
                                        double bound) {                                      \
    if (n_bins < 2 || n_bins > kMaxBins) return -1;                                          \
    backward<T, double>(x, workspace, grad_y, grad_log_det, grad_x, grad_params, rows,       \
                        n_features, n_bins, bound);                               \
    return 0;                                                                                \
  }

TRIGFARM_SPLINE_ENTRIES(float, f32)
TRIGFARM_SPLINE_ENTRIES(double, f64)

}  // extern "C"
