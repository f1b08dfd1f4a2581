// Runs kernels/merge.cu on the CPU (cuda_shim.h) with the launch sequence of
// src/compute/cuda/pipeline.rs (factor conversion, row bands, k blocks of 256 chained through a
// partial-sum buffer, DoRA row and column kernels) and compares every output bit for bit
// with a plain sequential implementation of the arithmetic contract of src/compute/cpu.rs.
// DoRA outputs may differ by 1 ulp (the GPU sums squares in a different order, in f64).
//
// Built and run by tests/nvrtc.rs (kernels_match_a_sequential_reference_on_the_cpu):
//   g++ -std=c++20 -O2 -pthread -ffp-contract=off -fno-strict-aliasing tests/gpu/emu/emu.cpp
// Exit status 0 when every case matches.
#include "cuda_shim.h"

#include "../../../kernels/merge.cu"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------------------
// Launch emulation

template <class A>
static void launch(void (*kern)(const A), unsigned gx, unsigned gy, const A& a, bool barrier) {
    gridDim = {gx, gy, 1};
    blockDim = {NT, 1, 1};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            blockIdx = {bx, by, 0};
            if (!barrier) {  // no __syncthreads: the threads may run one after another
                for (unsigned t = 0; t < NT; ++t) {
                    threadIdx = {t, 0, 0};
                    kern(a);
                }
                continue;
            }
            std::barrier<> bar(NT);
            ls_emu_barrier = &bar;
            std::vector<std::thread> ts;
            ts.reserve(NT);
            for (unsigned t = 0; t < NT; ++t)
                ts.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    kern(a);
                    bar.arrive_and_drop();
                });
            for (auto& th : ts) th.join();
            ls_emu_barrier = nullptr;
        }
}

// ---------------------------------------------------------------------------------------
// Reference side: its own conversions (bf16 as the `half` crate rounds, f16 through
// _Float16) and the contract written out sequentially.

static int esize(int dt) { return dt == DT_F64 ? 8 : dt == DT_F32 ? 4 : 2; }

static uint16_t ref_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    if ((x & 0x8000u) && (x & (3u * 0x8000u - 1u))) return (uint16_t)((x >> 16) + 1u);
    return (uint16_t)(x >> 16);
}

static void enc(int dt, float v, uint8_t* p) {
    switch (dt) {
        case DT_F32: std::memcpy(p, &v, 4); break;
        case DT_F64: { double d = v; std::memcpy(p, &d, 8); break; }
        case DT_BF16: { uint16_t h = ref_bf16(v); std::memcpy(p, &h, 2); break; }
        default: { _Float16 h = (_Float16)v; std::memcpy(p, &h, 2); break; }
    }
}

static float dec(int dt, const uint8_t* p) {
    switch (dt) {
        case DT_F32: { float f; std::memcpy(&f, p, 4); return f; }
        case DT_F64: { double d; std::memcpy(&d, p, 8); return (float)d; }
        case DT_BF16: { uint16_t h; std::memcpy(&h, p, 2); uint32_t x = (uint32_t)h << 16; float f; std::memcpy(&f, &x, 4); return f; }
        default: { _Float16 h; std::memcpy(&h, p, 2); return (float)h; }
    }
}

static float rnd(int dt, float v) {
    if (dt != DT_BF16 && dt != DT_F16) return v;
    uint8_t b[2];
    enc(dt, v, b);
    return dec(dt, b);
}

struct Tensor {
    int dt;
    std::vector<uint8_t> bytes;
    size_t n() const { return bytes.size() / esize(dt); }
    float at(size_t i) const { return dec(dt, &bytes[i * esize(dt)]); }
};

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float rnd01() {  // uniform in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)(rng_state >> 40) / (float)(1u << 24) * 2.0f - 1.0f;
}

static Tensor make(int dt, size_t n, float scale, float offset = 0.0f) {
    Tensor t{dt, std::vector<uint8_t>(n * esize(dt))};
    for (size_t i = 0; i < n; ++i) {
        float v = rnd01() * scale;
        if (offset != 0.0f) v = std::fabs(v) + offset;
        enc(dt, v, &t.bytes[i * esize(dt)]);
    }
    return t;
}

struct Step {
    bool transposed;
    int r;
    float scale;
    bool rdf;   // round delta first
    bool dora;
    Tensor a, b, mag;  // Normal: A [r, cols], B [rows, r]; Transposed: A [r, rows], B [cols, r]
};

struct Case {
    std::string name;
    int wd, out_dt;
    int rows, cols;
    Tensor w;
    int has_rep;
    Tensor rep;
    std::vector<Step> steps;
    size_t band_elems;
};

static float Lv(const Step& s, int rows, int i, int k) {  // L[i,k]
    return s.transposed ? s.a.at((size_t)k * rows + i) : s.b.at((size_t)i * s.r + k);
}
static float Rv(const Step& s, int cols, int k, int j) {  // R[k,j]
    return s.transposed ? s.b.at((size_t)j * s.r + k) : s.a.at((size_t)k * cols + j);
}

static std::vector<uint8_t> reference(const Case& c) {
    const int m = c.rows, n = c.cols;
    const Tensor& src = c.has_rep ? c.rep : c.w;
    std::vector<float> v(src.n());
    for (size_t i = 0; i < v.size(); ++i) v[i] = rnd(c.wd, src.at(i));
    for (const Step& s : c.steps) {
        std::vector<float> x(v.size());
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                // The contract of src/compute/gemm.rs: one FMA chain over k, ascending.
                float acc = 0.0f;
                for (int k = 0; k < s.r; ++k) acc = std::fma(Lv(s, m, i, k), Rv(s, n, k, j), acc);
                float d = acc * s.scale;
                if (s.rdf) d = rnd(c.wd, d);
                x[(size_t)i * n + j] = v[(size_t)i * n + j] + d;
            }
        if (s.dora && !s.transposed) {
            for (int i = 0; i < m; ++i) {
                double ss = 0;
                for (int j = 0; j < n; ++j) ss += (double)x[(size_t)i * n + j] * (double)x[(size_t)i * n + j];
                float f = s.mag.at(i) / (float)std::sqrt(ss);
                for (int j = 0; j < n; ++j) x[(size_t)i * n + j] *= f;
            }
        } else if (s.dora) {
            for (int j = 0; j < n; ++j) {
                double ss = 0;
                for (int i = 0; i < m; ++i) ss += (double)x[(size_t)i * n + j] * (double)x[(size_t)i * n + j];
                float f = s.mag.at(j) / (float)std::sqrt(ss);
                for (int i = 0; i < m; ++i) x[(size_t)i * n + j] *= f;
            }
        }
        for (size_t i = 0; i < v.size(); ++i) v[i] = rnd(c.wd, x[i]);
    }
    std::vector<uint8_t> out(v.size() * esize(c.out_dt));
    for (size_t i = 0; i < v.size(); ++i) enc(c.out_dt, v[i], &out[i * esize(c.out_dt)]);
    return out;
}

// ---------------------------------------------------------------------------------------
// Device side: what src/compute/cuda/pipeline.rs queues, with host memory for device memory.

struct DevStep {
    std::vector<float> lt, rc, mag, colf;
    const Step* s;
};

static std::vector<float> factor_f32(const Tensor& t, i64 outer, i64 inner, i64 s_outer, i64 s_inner) {
    std::vector<float> dst((size_t)(outer * inner));
    FactorArgs a{t.bytes.data(), dst.data(), s_outer, s_inner, outer, inner, t.dt, 0};
    i64 total = outer * inner;
    unsigned grid = (unsigned)std::clamp<i64>((total + NT - 1) / NT, 1, 1 << 16);
    launch(ls_factor_f32, grid, 1, a, false);
    return dst;
}

static void lora(const Case& c, const DevStep& d, int i0, int m, const void* in, int in_dt,
                 void* out, int out_dt, const float* colf, bool round_result, float* part) {
    const int n = c.cols;
    const int blocks = (d.s->r + 255) / 256;
    for (int blk = 0; blk < blocks; ++blk) {
        const int k0 = blk * 256;
        const bool last = blk + 1 == blocks;
        LoraArgs a{};
        a.lt = d.lt.data() + (size_t)k0 * c.rows + i0;
        a.rc = d.rc.data() + (size_t)k0 * n;
        a.in = in;
        a.out = out;
        a.colf = colf;
        a.part_in = blk > 0 ? part : nullptr;
        a.part_out = last ? nullptr : part;
        a.ld_l = c.rows;
        a.m = m;
        a.n = n;
        a.k = std::min(256, d.s->r - k0);
        a.in_dt = in_dt;
        a.out_dt = out_dt;
        a.wd = c.wd;
        a.scale = d.s->scale;
        a.round_delta_first = d.s->rdf;
        a.round_result = round_result;
        a.vec = n % 4 == 0;
        launch(ls_lora_band, (unsigned)((n + BN - 1) / BN), (unsigned)((m + BM - 1) / BM), a, true);
    }
}

// Steps [0, upto) of a band, then either the output (colsum null) or step `upto`'s
// unrounded value summed per column into colsum.
static void band(const Case& c, std::vector<DevStep>& ds, int i0, int m, const uint8_t* din,
                 uint8_t* dout, size_t upto, double* colsum, std::vector<float>& v,
                 std::vector<float>& part) {
    const int n = c.cols;
    const void* cur = din;
    int cur_dt = (c.has_rep ? c.rep : c.w).dt;
    for (size_t idx = 0; idx < upto; ++idx) {
        DevStep& d = ds[idx];
        const bool last = colsum == nullptr && idx + 1 == upto;
        void* dest = last ? (void*)dout : (void*)v.data();
        const int dest_dt = last ? c.out_dt : DT_F32;
        if (d.s->dora && !d.s->transposed) {
            lora(c, d, i0, m, cur, cur_dt, v.data(), DT_F32, nullptr, false, part.data());
            DoraRowsArgs a{v.data(), d.mag.data() + i0, last ? dest : nullptr, m, n, c.wd, dest_dt};
            launch(ls_dora_rows, (unsigned)m, 1, a, true);
        } else {
            lora(c, d, i0, m, cur, cur_dt, dest, dest_dt, d.s->dora ? d.colf.data() : nullptr, true,
                 part.data());
        }
        cur = v.data();
        cur_dt = DT_F32;
    }
    if (colsum) {
        lora(c, ds[upto], i0, m, cur, cur_dt, v.data(), DT_F32, nullptr, false, part.data());
        ColSumsqArgs a{v.data(), colsum, m, n};
        launch(ls_col_sumsq, (unsigned)((n + NT - 1) / NT), 1, a, false);
    }
}

static std::vector<uint8_t> device(const Case& c) {
    const int rows = c.rows, cols = c.cols;
    const Tensor& src = c.has_rep ? c.rep : c.w;
    size_t band_rows = std::max<size_t>(1, c.band_elems / cols);
    if (band_rows >= BM) band_rows -= band_rows % BM;
    band_rows = std::min<size_t>(band_rows, rows);
    std::vector<DevStep> ds;
    for (const Step& s : c.steps) {
        DevStep d;
        d.s = &s;
        const i64 r = s.r;
        // (l_si, l_sk, r_sk, r_sj) as in cuda/pipeline.rs
        const i64 l_si = s.transposed ? 1 : r, l_sk = s.transposed ? rows : 1;
        const i64 r_sk = s.transposed ? 1 : cols, r_sj = s.transposed ? r : 1;
        const Tensor& left = s.transposed ? s.a : s.b;
        const Tensor& right = s.transposed ? s.b : s.a;
        d.lt = factor_f32(left, r, rows, l_sk, l_si);
        d.rc = factor_f32(right, r, cols, r_sk, r_sj);
        if (s.dora)
            for (size_t i = 0; i < s.mag.n(); ++i) d.mag.push_back(s.mag.at(i));
        ds.push_back(std::move(d));
    }
    std::vector<float> v(band_rows * cols), part(band_rows * cols);
    const int es = esize(src.dt), oes = esize(c.out_dt);
    for (size_t j = 0; j < ds.size(); ++j) {
        if (!(ds[j].s->dora && ds[j].s->transposed)) continue;
        std::vector<double> colsum(cols, 0.0);
        for (size_t i0 = 0; i0 < (size_t)rows; i0 += band_rows) {
            const int m = (int)std::min(band_rows, rows - i0);
            band(c, ds, (int)i0, m, &src.bytes[i0 * cols * es], nullptr, j, colsum.data(), v, part);
        }
        for (int k = 0; k < cols; ++k) ds[j].colf.push_back(ds[j].mag[k] / (float)std::sqrt(colsum[k]));
    }
    std::vector<uint8_t> out((size_t)rows * cols * oes);
    for (size_t i0 = 0; i0 < (size_t)rows; i0 += band_rows) {
        const int m = (int)std::min(band_rows, rows - i0);
        band(c, ds, (int)i0, m, &src.bytes[i0 * cols * es], &out[i0 * cols * oes], ds.size(), nullptr,
             v, part);
    }
    return out;
}

// ---------------------------------------------------------------------------------------

static int64_t ordered(int dt, const uint8_t* p) {
    if (dt == DT_F16 || dt == DT_BF16) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return (h & 0x8000) ? 0x8000 - (int64_t)h : (int64_t)h;
    }
    float f = dec(dt, p);
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return (x & 0x80000000u) ? (int64_t)0x80000000u - (int64_t)x : (int64_t)x;
}

static Case mk(std::string name, int wd, int fd, int out_dt, int rows, int cols, int r,
               bool transposed, bool dora, bool rdf, size_t band_elems, int second = -1,
               int rep_dt = -1) {
    Case c;
    c.name = name;
    c.wd = wd;
    c.out_dt = out_dt;
    c.rows = rows;
    c.cols = cols;
    c.w = make(wd, (size_t)rows * cols, 0.5f);
    c.has_rep = rep_dt >= 0;
    if (c.has_rep) c.rep = make(rep_dt, (size_t)rows * cols, 0.5f);
    c.band_elems = band_elems;
    const int nsteps = second >= 0 ? 2 : 1;
    for (int s = 0; s < nsteps; ++s) {
        Step st;
        st.transposed = transposed;
        st.r = r;
        st.scale = s == 0 ? 2.0f : 0.375f;
        st.dora = s == 0 ? dora : second == 1;
        st.rdf = rdf && !st.dora;
        st.a = make(fd, (size_t)r * (transposed ? rows : cols), 0.3f);
        st.b = make(fd, (size_t)(transposed ? cols : rows) * r, 0.3f);
        if (st.dora) st.mag = make(fd, transposed ? cols : rows, 0.5f, 0.5f);
        c.steps.push_back(std::move(st));
    }
    return c;
}

int main() {
    const size_t big = 1 << 22;
    std::vector<Case> cases;
    cases.push_back(mk("tiny f32 r=1", DT_F32, DT_F32, DT_F32, 7, 5, 1, false, false, false, big));
    cases.push_back(mk("one element bf16", DT_BF16, DT_F32, DT_BF16, 1, 1, 1, false, false, false, big));
    cases.push_back(mk("bf16 vector epilogue", DT_BF16, DT_BF16, DT_BF16, 130, 260, 3, false, false, false, big));
    cases.push_back(mk("f16 odd columns, bands", DT_F16, DT_F32, DT_F16, 257, 129, 17, false, false, false, 129 * 40));
    cases.push_back(mk("bf16 r=300, k blocks, bands", DT_BF16, DT_F32, DT_BF16, 150, 132, 300, false, false, false, 132 * 70));
    cases.push_back(mk("f32 r=600", DT_F32, DT_F32, DT_F32, 70, 36, 600, false, false, false, big));
    cases.push_back(mk("f32 weight, bf16 output", DT_F32, DT_F32, DT_BF16, 64, 520, 16, false, false, false, big));
    cases.push_back(mk("f64 weight, f32 output", DT_F64, DT_F64, DT_F32, 33, 20, 4, false, false, false, big));
    cases.push_back(mk("f64 weight and output", DT_F64, DT_F32, DT_F64, 40, 44, 8, false, false, false, big));
    cases.push_back(mk("f16 factors, f32 weight, f16 out", DT_F32, DT_F16, DT_F16, 32, 72, 4, false, false, false, big));
    cases.push_back(mk("conv1d f32", DT_F32, DT_F32, DT_F32, 96, 200, 8, true, false, false, big));
    cases.push_back(mk("conv1d f16, bands", DT_F16, DT_F16, DT_F16, 150, 72, 8, true, false, false, 5000));
    cases.push_back(mk("embedding bf16, delta rounded first", DT_BF16, DT_F32, DT_BF16, 300, 64, 8, true, false, true, big));
    cases.push_back(mk("dora rows f32", DT_F32, DT_F32, DT_F32, 48, 64, 4, false, true, false, big));
    cases.push_back(mk("dora rows bf16, bands", DT_BF16, DT_F32, DT_BF16, 100, 64, 8, false, true, false, 64 * 20));
    cases.push_back(mk("dora columns f32, bands", DT_F32, DT_F32, DT_F32, 100, 70, 4, true, true, false, 70 * 33));
    cases.push_back(mk("dora columns bf16", DT_BF16, DT_F32, DT_BF16, 64, 48, 4, true, true, false, big));
    cases.push_back(mk("two steps f16", DT_F16, DT_F32, DT_F16, 96, 128, 8, false, false, false, big, 0));
    cases.push_back(mk("dora then lora f16", DT_F16, DT_F32, DT_F16, 64, 80, 4, false, true, false, big, 0));
    cases.push_back(mk("lora then dora bf16", DT_BF16, DT_F32, DT_BF16, 64, 80, 4, false, false, false, big, 1));
    cases.push_back(mk("replaced embedding", DT_BF16, DT_F32, DT_BF16, 200, 64, 8, true, false, true, big, -1, DT_F32));
    cases.push_back(mk("300 x 260 r=64 bf16, bands", DT_BF16, DT_BF16, DT_BF16, 300, 260, 64, false, false, false, 260 * 128));
    int failed = 0;
    for (const Case& c : cases) {
        const std::vector<uint8_t> want = reference(c), got = device(c);
        const int es = esize(c.out_dt);
        bool any_dora = false;
        for (const Step& s : c.steps) any_dora |= s.dora;
        int64_t worst = 0;
        size_t diff = 0;
        for (size_t i = 0; i < want.size() / es; ++i) {
            if (std::memcmp(&want[i * es], &got[i * es], es) == 0) continue;
            ++diff;
            worst = std::max<int64_t>(worst, std::llabs(ordered(c.out_dt, &want[i * es]) - ordered(c.out_dt, &got[i * es])));
        }
        const bool ok = diff == 0 || (any_dora && worst <= 1);
        std::printf("%-4s %-40s %zu of %zu differ, worst %lld ulp\n", ok ? "ok" : "FAIL", c.name.c_str(),
                    diff, want.size() / es, (long long)worst);
        failed += !ok;
    }
    std::printf("%d of %zu cases failed\n", failed, cases.size());
    return failed ? 1 : 0;
}
