// Qualifiers that let the shared math compile for both host (the CPU kernels) and device (the CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GF_HOST_DEVICE __host__ __device__
#else
#define GF_HOST_DEVICE
#endif

#define GF_INLINE GF_HOST_DEVICE inline
