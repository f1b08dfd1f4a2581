// lorastream merge kernels, compiled at run time by NVRTC (src/compute/cuda.rs embeds this
// file with include_str!). No headers: NVRTC without the CUDA toolkit has no cuda_fp16.h or
// cuda_bf16.h, so f16 and bf16 travel as unsigned short and are converted by hand.
//
// Arithmetic contract (the same as src/compute/cpu.rs, step by step):
//   value  = decode(source)                          (W, or the last full replacement)
//            rounded into the weight's dtype `wd`
//   for each LoRA step:
//     acc   = sum over k of L[i,k] * R[k,j]          (one f32 FMA chain, k ascending, from +0:
//                                                   acc = fma(L[i,k], R[k,j], acc); for
//                                                   r > 256 one launch per 256 values of k,
//                                                   each resuming the chain from the partial
//                                                   the last one stored: the contract of
//                                                   src/compute/gemm.rs, so CPU paths and GPU
//                                                   give the same bits)
//     d     = acc * scale                            (rounded to f32)
//     d     = round_wd(d)       if round_delta_first (PEFT's plain Embedding merge)
//     x     = value + d
//     DoRA, rows (Linear/Conv):      x *= mag[i] / ||row i of x||   (norm in f64, ls_dora_rows)
//     DoRA, columns (Conv1D/Emb.):   x *= colf[j]    (colf = mag[j] / ||column j||, from a pass
//                                                     of ls_col_sumsq over every band first)
//     value = round_wd(x)                            (PEFT merges in place, in the weight dtype)
//   out = encode(out_dtype, value)                   (round to nearest even, NaN stays NaN)
//
// Every rounding is explicit (__fmul_rn / __fadd_rn / __fdiv_rn never contract into an FMA),
// and the only FMAs are the ones of the dot product.
//
// dtype codes (keep in sync with cuda.rs): 0 f32, 1 f16, 2 bf16, 3 f64.
//
// tests/gpu/emu/ compiles this file unchanged as C++ for the CPU (LS_HOST_EMULATION: 256
// threads per block with a barrier for __syncthreads) and checks every kernel bit for bit
// against a sequential reference, so the indexing is tested without a GPU.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_F64 3

// Output tile BM x BN per block of 256 threads (16 x 16), each thread 8 x 8 values
// (rows ty*4+{0..3} and 64+ty*4+{0..3}, columns tx*4+{0..3} and 64+tx*4+{0..3}); the
// reduction dimension walks in slices of BK through shared memory.
#define BM 128
#define BN 128
#define BK 16
#define NT 256
#define PAD 4

// ---------------------------------------------------------------------------------------
// Conversions (bit-exact with the `half` crate that the CPU path uses)

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);  // NaN: keep the high payload, make it quiet
    }
    const u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return (u16)((x >> 16) + 1u);
    }
    return (u16)(x >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0u) {
        // NaN: as `half` widens it (quiet bit set, payload kept).
        return __uint_as_float(((u32)(h & 0x8000u) << 16) | 0x7fc00000u |
                               ((u32)(h & 0x03ffu) << 13));
    }
#ifdef LS_HOST_EMULATION
    return ls_emu_f16_to_f32(h);  // tests/gpu/emu: the same conversion on the CPU
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x007fffffu) != 0u) {
        // NaN: as `half` narrows it (quiet bit set, high payload kept).
        return (u16)(((x >> 16) & 0x8000u) | 0x7c00u | 0x0200u | ((x & 0x007fffffu) >> 13));
    }
#ifdef LS_HOST_EMULATION
    return ls_emu_f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));  // round to nearest even, subnormals kept
    return h;
#endif
}

// value -> dtype -> f32 (identity for f32 and f64, like cpu.rs round_through)
__device__ __forceinline__ float round_to(int dt, float v) {
    if (dt == DT_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (dt == DT_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

__device__ __forceinline__ float ld(const void* p, int dt, i64 i) {
    switch (dt) {
        case DT_F16: return f16_to_f32(((const u16*)p)[i]);
        case DT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        case DT_F64: return (float)(((const double*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

__device__ __forceinline__ void st(void* p, int dt, i64 i, float v) {
    switch (dt) {
        case DT_F16: ((u16*)p)[i] = f32_to_f16(v); break;
        case DT_BF16: ((u16*)p)[i] = f32_to_bf16(v); break;
        case DT_F64: ((double*)p)[i] = (double)v; break;
        default: ((float*)p)[i] = v; break;
    }
}

// Four consecutive elements; `i` is a multiple of 4 and the base pointer is aligned to at
// least 4 elements, so one vector access serves them.
__device__ __forceinline__ void ld4(const void* p, int dt, i64 i, float v[4]) {
    switch (dt) {
        case DT_F16:
        case DT_BF16: {
            uint2 w = *(const uint2*)((const u16*)p + i);
            u16 h[4] = {(u16)(w.x & 0xffffu), (u16)(w.x >> 16), (u16)(w.y & 0xffffu),
                        (u16)(w.y >> 16)};
#pragma unroll
            for (int q = 0; q < 4; ++q) v[q] = dt == DT_F16 ? f16_to_f32(h[q]) : bf16_to_f32(h[q]);
            break;
        }
        case DT_F64: {
            double2 a = *(const double2*)((const double*)p + i);
            double2 b = *(const double2*)((const double*)p + i + 2);
            v[0] = (float)a.x; v[1] = (float)a.y; v[2] = (float)b.x; v[3] = (float)b.y;
            break;
        }
        default: {
            float4 f = *(const float4*)((const float*)p + i);
            v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
            break;
        }
    }
}

__device__ __forceinline__ void st4(void* p, int dt, i64 i, const float v[4]) {
    switch (dt) {
        case DT_F16:
        case DT_BF16: {
            u16 h[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) h[q] = dt == DT_F16 ? f32_to_f16(v[q]) : f32_to_bf16(v[q]);
            uint2 w;
            w.x = (u32)h[0] | ((u32)h[1] << 16);
            w.y = (u32)h[2] | ((u32)h[3] << 16);
            *(uint2*)((u16*)p + i) = w;
            break;
        }
        case DT_F64: {
            *(double2*)((double*)p + i) = make_double2((double)v[0], (double)v[1]);
            *(double2*)((double*)p + i + 2) = make_double2((double)v[2], (double)v[3]);
            break;
        }
        default:
            *(float4*)((float*)p + i) = make_float4(v[0], v[1], v[2], v[3]);
            break;
    }
}

// ---------------------------------------------------------------------------------------
// Factors to f32, once per tensor: dst[o * inner + i] = src[o * s_outer + i * s_inner].
// The fused kernel takes L as L^T [k][rows] and R as [k][cols], both f32, so its tile loads
// are coalesced and free of dtype branches whatever the layout (Normal: L = B [rows, r],
// R = A [r, cols]; Transposed: L = A^T, R = B^T) and the stored dtype.

struct FactorArgs {
    const void* src;
    float* dst;
    i64 s_outer, s_inner;
    i64 outer, inner;
    int dt;
    int pad_;
};
static_assert(sizeof(FactorArgs) == 56, "FactorArgs layout must match cuda.rs");

extern "C" __global__ void __launch_bounds__(NT) ls_factor_f32(const FactorArgs a) {
    const i64 total = a.outer * a.inner;
    for (i64 t = (i64)blockIdx.x * NT + threadIdx.x; t < total; t += (i64)gridDim.x * NT) {
        const i64 o = t / a.inner, i = t - o * a.inner;
        a.dst[t] = ld(a.src, a.dt, o * a.s_outer + i * a.s_inner);
    }
}

// ---------------------------------------------------------------------------------------
// The fused LoRA band kernel: out[i,j] = step(in[i,j], scale * sum_k L[i,k] R[k,j]) for a
// band of m rows and n columns. Tiles of L^T and R go through shared memory (BK values of k
// at a time, the next slice fetched into registers while the current one is multiplied);
// each thread keeps 8 x 8 sums in registers. The epilogue stages the sums through shared
// memory in two halves of 64 rows so that the weight is read and the output written in
// row-contiguous, vectorised runs (32 threads x 4 values per row).

struct LoraArgs {
    const float* lt;    // L^T [k][ld_l] (f32), offset to the band's first row
    const float* rc;    // R [k][n] (f32)
    const void* in;     // value before the step (source dtype or f32 scratch); may equal out
    void* out;          // value after the step
    const float* colf;  // DoRA column factors (n values) or null
    const float* part_in;  // the chain after earlier k blocks ([m][n] f32; acc starts there) or null
    float* part_out;       // non-null: store acc here and stop (more k blocks follow)
    i64 ld_l;           // row stride of L^T (the tensor's rows)
    int m, n, k;
    int in_dt, out_dt, wd;
    float scale;
    int round_delta_first;
    int round_result;  // 0: leave x unrounded in f32 (DoRA norms still to come)
    int vec;           // 1: n % 4 == 0 (rows start 4-element aligned): vector epilogue
};
static_assert(sizeof(LoraArgs) == 104, "LoraArgs layout must match cuda.rs");

__device__ __forceinline__ float merge_elem(const LoraArgs& a, float acc, float x_in, float cf) {
    float d = __fmul_rn(acc, a.scale);
    if (a.round_delta_first) d = round_to(a.wd, d);
    float x = __fadd_rn(round_to(a.wd, x_in), d);
    if (a.colf != 0) x = __fmul_rn(x, cf);
    if (a.round_result) x = round_to(a.wd, x);
    return x;
}

#define LDS (BM + PAD)           // row stride of the tiles in shared memory
#define SMEM_FLOATS (64 * LDS)   // epilogue half tile; the k-slices (2 * BK * LDS) fit inside

// Rows [row0, row0 + 64) of the block's tile, sums in S[64][LDS].
__device__ __forceinline__ void epilogue_half(const LoraArgs& a, const float* S, int i0, int j0,
                                              int row0) {
#pragma unroll 1
    for (int p = 0; p < 8; ++p) {
        const int g = threadIdx.x + p * NT;  // 0..2047: 64 rows x 32 groups of 4 columns
        const int rr = g >> 5;
        const int cg = (g & 31) * 4;
        const int gi = i0 + row0 + rr, gj = j0 + cg;
        if (gi >= a.m || gj >= a.n) continue;
        const float* sp = S + rr * LDS + cg;
        const i64 base = (i64)gi * a.n + gj;
        float s[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) s[q] = sp[q];
        if (a.part_out != 0) {
#pragma unroll 1
            for (int q = 0; q < 4 && gj + q < a.n; ++q) a.part_out[base + q] = s[q];
            continue;
        }
        if (a.vec) {
            float x[4];
            ld4(a.in, a.in_dt, base, x);
#pragma unroll
            for (int q = 0; q < 4; ++q)
                x[q] = merge_elem(a, s[q], x[q], a.colf != 0 ? a.colf[gj + q] : 1.0f);
            st4(a.out, a.out_dt, base, x);
        } else {
#pragma unroll 1
            for (int q = 0; q < 4 && gj + q < a.n; ++q) {
                const float x = ld(a.in, a.in_dt, base + q);
                st(a.out, a.out_dt, base + q,
                   merge_elem(a, s[q], x, a.colf != 0 ? a.colf[gj + q] : 1.0f));
            }
        }
    }
}

__device__ __forceinline__ void lora_band(const LoraArgs& a) {
    __shared__ __align__(16) float smem[SMEM_FLOATS];
    float(*Ls)[LDS] = (float(*)[LDS])smem;               // [BK][LDS]: L^T slice
    float(*Rs)[LDS] = (float(*)[LDS])(smem + BK * LDS);  // [BK][LDS]: R slice

    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const int i0 = blockIdx.y * BM;
    const int j0 = blockIdx.x * BN;

    // The FMA chain starts at +0, or (a later k block) at the partial the last launch stored
    // for the same element: one chain over all of k, whatever the blocking.
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    if (a.part_in != 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int gi = i0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int gj = j0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
                if (gi < a.m && gj < a.n) acc[i][j] = a.part_in[(i64)gi * a.n + gj];
            }
        }
    }

    // Thread t of slice element e = tid + p*NT loads row/column (e & 127) of k (e >> 7):
    // consecutive threads read consecutive addresses.
    const int e_ij = tid & (BM - 1);
    const int e_k = tid >> 7;  // 0 or 1; + 2p
    const bool l_in = i0 + e_ij < a.m;
    const bool r_in = j0 + e_ij < a.n;
    const float* lp = a.lt + (i0 + e_ij);
    const float* rp = a.rc + (j0 + e_ij);
    float lreg[8], rreg[8];
    const int nk = (a.k + BK - 1) / BK;

#define LOAD_SLICE(kt)                                                     \
    {                                                                      \
        _Pragma("unroll") for (int p = 0; p < 8; ++p) {                    \
            const int gk = (kt) * BK + e_k + 2 * p;                        \
            lreg[p] = (l_in && gk < a.k) ? lp[(i64)gk * a.ld_l] : 0.0f;    \
            rreg[p] = (r_in && gk < a.k) ? rp[(i64)gk * a.n] : 0.0f;       \
        }                                                                  \
    }

    LOAD_SLICE(0);
    for (int kt = 0; kt < nk; ++kt) {
        // Registers -> shared memory (the previous slice's readers are past the barrier).
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            Ls[e_k + 2 * p][e_ij] = lreg[p];
            Rs[e_k + 2 * p][e_ij] = rreg[p];
        }
        __syncthreads();
        if (kt + 1 < nk) LOAD_SLICE(kt + 1);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *(const float4*)&Ls[kk][ty * 4];
            const float4 a1 = *(const float4*)&Ls[kk][64 + ty * 4];
            const float4 b0 = *(const float4*)&Rs[kk][tx * 4];
            const float4 b1 = *(const float4*)&Rs[kk][64 + tx * 4];
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#undef LOAD_SLICE

    // Epilogue, rows 0..63 (this thread's rows ty*4 + 0..3), then 64..127 (64 + ty*4 + 0..3).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ri = half * 4 + i;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                *(float4*)&smem[(ty * 4 + i) * LDS + h * 64 + tx * 4] = make_float4(
                    acc[ri][h * 4], acc[ri][h * 4 + 1], acc[ri][h * 4 + 2], acc[ri][h * 4 + 3]);
            }
        }
        __syncthreads();
        epilogue_half(a, smem, i0, j0, half * 64);
        __syncthreads();
    }
}
// At most 128 registers: two blocks (16 warps) per SM.
extern "C" __global__ void __launch_bounds__(NT, 2) ls_lora_band(const LoraArgs a) {
    lora_band(a);
}

// ---------------------------------------------------------------------------------------
// DoRA on rows (Linear, Conv): one block per row. v holds x = value + delta (unrounded f32);
// the row is scaled by mag[i] / ||x_i|| (sum of squares in f64), rounded into wd and written
// to out (out_dt) or back into v when out is null.

struct DoraRowsArgs {
    float* v;
    const float* mag;  // offset to the band's first row
    void* out;
    int m, n, wd, out_dt;
};
static_assert(sizeof(DoraRowsArgs) == 40, "DoraRowsArgs layout must match cuda.rs");

extern "C" __global__ void __launch_bounds__(NT) ls_dora_rows(const DoraRowsArgs a) {
    __shared__ double part[NT];
    const int row = blockIdx.x;
    if (row >= a.m) return;
    const i64 base = (i64)row * a.n;
    double s = 0.0;
    for (int j = threadIdx.x; j < a.n; j += NT) {
        const double x = (double)a.v[base + j];
        s = __dadd_rn(s, __dmul_rn(x, x));
    }
    part[threadIdx.x] = s;
    __syncthreads();
    const int t = threadIdx.x;
    for (int w = NT / 2; w > 0; w >>= 1) {
        if (t < w) part[t] = __dadd_rn(part[t], part[t + w]);
        __syncthreads();
    }
    const float norm = (float)sqrt(part[0]);
    const float f = __fdiv_rn(a.mag[row], norm);
    for (int j = threadIdx.x; j < a.n; j += NT) {
        const float y = round_to(a.wd, __fmul_rn(a.v[base + j], f));
        if (a.out != 0) {
            st(a.out, a.out_dt, base + j, y);
        } else {
            a.v[base + j] = y;
        }
    }
}

// ---------------------------------------------------------------------------------------
// DoRA on columns (Conv1D, Embedding), first pass: colsum[j] += sum over the band's rows of
// x[i,j]^2 in f64, one thread per column, rows in order (bands arrive in order too).

struct ColSumsqArgs {
    const float* v;
    double* colsum;
    int m, n;
};
static_assert(sizeof(ColSumsqArgs) == 24, "ColSumsqArgs layout must match cuda.rs");

extern "C" __global__ void __launch_bounds__(NT) ls_col_sumsq(const ColSumsqArgs a) {
    const int j = blockIdx.x * NT + threadIdx.x;
    if (j >= a.n) return;
    double s = 0.0;
    for (int i = 0; i < a.m; ++i) {
        const double x = (double)a.v[(i64)i * a.n + j];
        s = __dadd_rn(s, __dmul_rn(x, x));
    }
    a.colsum[j] = __dadd_rn(a.colsum[j], s);
}
