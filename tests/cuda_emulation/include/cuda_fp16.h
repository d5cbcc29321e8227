// Host emulation (tests/cuda_emulation): __half as c10::Half, whose conversions round to nearest even as
// __float2half_rn does.
#pragma once
#include <c10/util/Half.h>

using __half = c10::Half;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
