// A vectorisable float exp shared by the CPU kernels (channel masks, KL gap); CUDA uses it too so
// both backends run the same math. libm's expf is a scalar call per element: in a softmax it was
// most of the time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace s2h {

S2H_HD_INLINE float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

// exp(x) for x <= 0 in float (correct up to x < 88.37 as well), about 2 ulp, branch-free so it
// vectorises (Cephes expf: x = n ln2 + r, degree-6 polynomial, 2^n built in the exponent bits).
// Results below exp(-87) (the smallest value that stays a normal float) flush to 0: a denormal
// probability is a zero probability here, and denormals would slow every later SIMD operation.
// -inf -> 0, NaN -> NaN. Compile with -fno-trapping-math so the selects if-convert.
S2H_HD_INLINE float exp_f32(float x) {
  const float kLo = -87.0f, kHi = 88.3762626647949f;
  const bool nan = x != x, under = x < kLo, over = x > kHi;
  const float xc = nan ? 0.0f : (under ? kLo : (over ? kHi : x));  // no NaN into the int conversion
  // Round x*log2(e) to the nearest integer with the 1.5*2^23 shifter (exact for |n| < 2^22).
  const float kShift = 12582912.0f;
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float res = y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return nan ? x : (under ? 0.0f : res);
}

S2H_HD_INLINE float kexp(float x) { return exp_f32(x); }
S2H_HD_INLINE double kexp(double x) { return exp(x); }

}  // namespace s2h
