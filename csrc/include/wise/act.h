// Activations applied inside the routing distance, with their derivatives.
// The ids match the order of the names parse_act reads in csrc/checks.cpp.
#pragma once
#include <cmath>
#include "common.h"

namespace wise {

enum class Act : int { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

template <typename T>
WISE_HD T act_forward(T x, Act act) {
#if !defined(__CUDA_ARCH__)
  using std::erf;
  using std::exp;
  using std::tanh;
#endif
  switch (act) {
    case Act::Relu:
      return x > T(0) ? x : T(0);
    case Act::Gelu:
      return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752440)));
    case Act::GeluTanh: {
      T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + tanh(u));
    }
    case Act::Silu:
      return x / (T(1) + exp(-x));
    default:
      return x;
  }
}

template <typename T>
WISE_HD T act_derivative(T x, Act act) {
#if !defined(__CUDA_ARCH__)
  using std::erf;
  using std::exp;
  using std::tanh;
#endif
  switch (act) {
    case Act::Relu:
      return x > T(0) ? T(1) : T(0);
    case Act::Gelu: {
      T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752440)));
      T pdf = T(0.39894228040143267794) * exp(T(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case Act::GeluTanh: {
      T k = T(0.79788456080286535588);
      T u = k * (x + T(0.044715) * x * x * x);
      T t = tanh(u);
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * x * x);
    }
    case Act::Silu: {
      T s = T(1) / (T(1) + exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    default:
      return T(1);
  }
}

// Squared routing distance of one token: sum_j (act(y1_j) - act(y0_j))^2, with
// element strides so the same loop serves a row of any (token, memory) layout.
template <typename Acc, typename T>
WISE_HD Acc squared_distance(const T* y0, const T* y1, int64_t n, Act act) {
  Acc ss = Acc(0);
  for (int64_t j = 0; j < n; ++j) {
    Acc diff = act_forward(static_cast<Acc>(y1[j]), act) - act_forward(static_cast<Acc>(y0[j]), act);
    ss += diff * diff;
  }
  return ss;
}

}  // namespace wise
