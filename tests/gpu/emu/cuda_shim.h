// Just enough of CUDA to run kernels/merge.cu on the CPU, for tests/gpu/emu/emu.cpp.
// A block runs as 256 std::threads; __syncthreads is a std::barrier; __shared__ arrays are
// function statics (blocks run one after another). Conversions that merge.cu does with
// inline PTX use _Float16, which rounds to nearest even like cvt.rn.f16.f32.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define LS_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct ls_dim3 {
    unsigned x, y, z;
};
inline thread_local ls_dim3 threadIdx{0, 0, 0};
inline ls_dim3 blockIdx{0, 0, 0};
inline ls_dim3 gridDim{1, 1, 1};
inline ls_dim3 blockDim{256, 1, 1};
inline std::barrier<>* ls_emu_barrier = nullptr;

inline void __syncthreads() { ls_emu_barrier->arrive_and_wait(); }

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
// Compiled with -ffp-contract=off: these round once each, like the _rn intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
using std::sqrt;

inline float ls_emu_f16_to_f32(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline unsigned short ls_emu_f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
