// zeroserve CPU kernels: y [M, N] fp32 = x [M, K] fp32 W^T + bias, W held in bfloat16 only
// (mode "bf16": bf16 weights, fp32 activations everywhere else). Python side: kernels/cpu/bf16.py.
//
// W layout, packed once by bf16.py (K2 = ceil(K / 2), the last pair and the last panel
// zero-padded):
//
//     panels [ceil(N / 16)][K2][16][2] bf16     panel p, pair k, column j: W[16p + j][2k], W[16p + j][2k + 1]
//
// i.e. one 64-byte cache line per (panel, k-pair): exactly the operand of AVX512-BF16's
// vdpbf16ps, which adds x[2k] * w[2k] + x[2k + 1] * w[2k + 1] into 16 fp32 lanes. x is rounded
// to bf16 pairs once per call (round to nearest even, as torch's .bfloat16()), and each pair is
// broadcast as one 32-bit word. Products of two bf16 are exact in fp32; the sums are fp32.
//
// The loop structure is zs_linear's (cpu_ops.cpp): each group of two panels (32 columns) is
// read once per chunk of rows and used by every row block of the chunk; the first row block of
// the last chunk prefetches the next group, one line per panel per k-pair, so at decode sizes
// the weights stream under the arithmetic. Threads take runs of consecutive groups (each run one
// sequential stream of W), dynamically rather than zs_linear's fixed ranges.
//
// Built with avx512_bf16 (and not -DZS_SCALAR): intrinsics; otherwise the same algorithm on
// portable loops (correct, slow: bf16.py then says the kernel is not available and the CPU
// backend serves mode "bf16" through oneDNN).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "zs_kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && !defined(ZS_SCALAR)
#include <immintrin.h>
#define ZS_BF16_AVX512 1
#endif

namespace {

constexpr int64_t kBf16Panel = 16;       // output columns per panel (one zmm of fp32 sums)
constexpr int64_t kBf16ChunkRows = 128;  // rows of x per pass over the weights (bf16 x: <= K * 256 bytes)
#ifndef ZS_BF16_MR
#define ZS_BF16_MR 8
#endif
// rows per micro-kernel (2 x MR accumulators); 4 to 12 measured alike (~200 GFLOP/s on one core)
constexpr int kMaxRows = ZS_BF16_MR;

// A call runs on the calling thread below this many multiply-adds (waking the pool's sleeping
// threads costs tens of microseconds with OMP_WAIT_POLICY=PASSIVE) or below this many rows of x.
// Up to ~10 rows a call is bound by streaming W from memory, and on the 2-core EPYC we measure
// on, one core alone streams it at ~20 GB/s with 1-8 rows (benchmarks/bench_bf16.py --cpu-time),
// the machine's peak: a second thread can only add its wake-up and the barrier. Where one core
// cannot saturate memory (a many-core server), build with -DZS_BF16_PARALLEL_ROWS=1.
#ifndef ZS_BF16_PARALLEL_MACS
#define ZS_BF16_PARALLEL_MACS (1 << 19)
#endif
#ifndef ZS_BF16_PARALLEL_ROWS
#define ZS_BF16_PARALLEL_ROWS 12
#endif

inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

// x [M, K] (rows xs apart) -> xb [M, 2 * K2] bf16, zero-padded to pairs.
void convert_rows(const float* x, int64_t xs, int64_t row0, int64_t row1, int64_t K, uint16_t* xb) {
    const int64_t K2 = (K + 1) / 2;
    for (int64_t m = row0; m < row1; ++m) {
        const float* src = x + m * xs;
        uint16_t* dst = xb + 2 * m * K2;
        int64_t k = 0;
#ifdef ZS_BF16_AVX512
        for (; k + 32 <= K; k += 32) {
            const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
            _mm512_storeu_si512(dst + k, reinterpret_cast<const __m512i&>(h));
        }
#endif
        for (; k < K; ++k) dst[k] = to_bf16(src[k]);
        if (K % 2) dst[K] = 0;
    }
}

#ifdef ZS_BF16_AVX512
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// MR rows x NP panels (NP = 1 or 2): 2 * MR accumulators at most, 16 of 32 zmm registers
// at MR = 8; per k-pair NP loads of W and MR broadcasts of x feed NP * MR vdpbf16ps.
template <int MR, int NP>
__attribute__((noinline)) void bf16_kernel(const uint16_t* __restrict xb, int64_t K2, const uint16_t* __restrict w,
                                           int64_t panel_elems, float* __restrict y, int64_t ys, int64_t ncols,
                                           const float* __restrict bias, const uint16_t* prefetch,
                                           int64_t prefetch_pairs) {
    __m512 acc[MR][NP];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    const uint16_t* w1 = w + panel_elems;
    auto step = [&](int64_t k) {
        const __m512bh b0 = as_bh(_mm512_loadu_si512(w + k * 2 * kBf16Panel));
        const __m512bh b1 = NP > 1 ? as_bh(_mm512_loadu_si512(w1 + k * 2 * kBf16Panel)) : b0;
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            int32_t pair;  // x[2k], x[2k + 1] of row r
            std::memcpy(&pair, xb + 2 * (r * K2 + k), sizeof(pair));
            const __m512bh a = as_bh(_mm512_set1_epi32(pair));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            if (NP > 1) acc[r][NP - 1] = _mm512_dpbf16_ps(acc[r][NP - 1], a, b1);
        }
    };
    int64_t k = 0;
    for (const int64_t kp = std::min(prefetch_pairs, K2); k < kp; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * 2 * kBf16Panel), _MM_HINT_T1);
        if (NP > 1)
            _mm_prefetch(reinterpret_cast<const char*>(prefetch + panel_elems + k * 2 * kBf16Panel), _MM_HINT_T1);
        step(k);
    }
    for (; k < K2; ++k) step(k);
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
        const int64_t cols = std::min<int64_t>(kBf16Panel, ncols - j * kBf16Panel);
        const __mmask16 mask = static_cast<__mmask16>(cols >= 16 ? 0xffffu : (1u << cols) - 1u);
        const __m512 d = bias != nullptr ? _mm512_loadu_ps(bias + j * kBf16Panel) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ys + j * kBf16Panel, mask, _mm512_add_ps(acc[r][j], d));
    }
}

template <int NP>
void row_block_np(int64_t rows, const uint16_t* xb, int64_t K2, const uint16_t* w, int64_t panel_elems, float* y,
                  int64_t ys, int64_t ncols, const float* bias, const uint16_t* prefetch, int64_t prefetch_pairs) {
#define ZS_BF16_CASE(R) \
    case R: bf16_kernel<R, NP>(xb, K2, w, panel_elems, y, ys, ncols, bias, prefetch, prefetch_pairs); break;
    static_assert(kMaxRows >= 1 && kMaxRows <= 12, "ZS_BF16_MR is 1..12");
    switch (rows) {
        ZS_BF16_CASE(12)
        ZS_BF16_CASE(11)
        ZS_BF16_CASE(10)
        ZS_BF16_CASE(9)
        ZS_BF16_CASE(8)
        ZS_BF16_CASE(7)
        ZS_BF16_CASE(6)
        ZS_BF16_CASE(5)
        ZS_BF16_CASE(4)
        ZS_BF16_CASE(3)
        ZS_BF16_CASE(2)
        default: bf16_kernel<1, NP>(xb, K2, w, panel_elems, y, ys, ncols, bias, prefetch, prefetch_pairs); break;
    }
#undef ZS_BF16_CASE
}

void row_block(int64_t rows, int64_t np, const uint16_t* xb, int64_t K2, const uint16_t* w, int64_t panel_elems,
               float* y, int64_t ys, int64_t ncols, const float* bias, const uint16_t* prefetch,
               int64_t prefetch_pairs) {
    if (np == 2)
        row_block_np<2>(rows, xb, K2, w, panel_elems, y, ys, ncols, bias, prefetch, prefetch_pairs);
    else
        row_block_np<1>(rows, xb, K2, w, panel_elems, y, ys, ncols, bias, prefetch, prefetch_pairs);
}
#else
// Portable loops, same sums: per k-pair, the odd product then the even one, added in fp32.
// Each (k-pair, column) is read as one 32-bit word and split: gcc 12 -O3 miscompiled the
// stride-2 reads of the two halves (wrong sums, found by the tests).
void row_block(int64_t rows, int64_t np, const uint16_t* xb, int64_t K2, const uint16_t* w, int64_t panel_elems,
               float* y, int64_t ys, int64_t ncols, const float* bias, const uint16_t*, int64_t) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = xb + 2 * r * K2;
        for (int64_t j = 0; j < np; ++j) {
            const uint16_t* wp = w + j * panel_elems;
            float acc[kBf16Panel] = {};
            for (int64_t k = 0; k < K2; ++k) {
                const float x0 = from_bf16(xr[2 * k]), x1 = from_bf16(xr[2 * k + 1]);
                const uint16_t* wk = wp + k * 2 * kBf16Panel;
                for (int64_t c = 0; c < kBf16Panel; ++c) {
                    uint32_t pair;
                    std::memcpy(&pair, wk + 2 * c, sizeof(pair));
                    const uint32_t lo = pair << 16, hi = pair & 0xffff0000u;
                    float w0, w1;
                    std::memcpy(&w0, &lo, sizeof(w0));
                    std::memcpy(&w1, &hi, sizeof(w1));
                    acc[c] += x1 * w1;
                    acc[c] += x0 * w0;
                }
            }
            const int64_t cols = std::min(kBf16Panel, ncols - j * kBf16Panel);
            for (int64_t c = 0; c < cols; ++c)
                y[r * ys + j * kBf16Panel + c] = acc[c] + (bias != nullptr ? bias[j * kBf16Panel + c] : 0.0f);
        }
    }
}
#endif

}  // namespace

extern "C" {

// 1 where this build runs the AVX512-BF16 kernel, 0 for the portable loops.
int zs_bf16_vectorized() {
#ifdef ZS_BF16_AVX512
    return 1;
#else
    return 0;
#endif
}

// y [M, N] (rows N apart) = x [M, K] (rows x_stride apart) W^T + bias, with W in the panels
// above and bias padded to ceil(N / 16) * 16 floats (or null).
void zs_bf16_linear(const float* x, int64_t x_stride, const uint16_t* packed, const float* bias, float* y, int64_t M,
                    int64_t N, int64_t K) {
    if (M <= 0 || N <= 0) return;
    const int64_t K2 = (K + 1) / 2, panels = (N + kBf16Panel - 1) / kBf16Panel;
    const int64_t panel_elems = K2 * 2 * kBf16Panel, groups = (panels + 1) / 2;
    // x in bf16 pairs: this thread's buffer, reused by later calls (a decode step makes ~200)
    static thread_local std::vector<uint16_t> buffer;
    if (static_cast<int64_t>(buffer.size()) < 2 * M * K2) buffer.resize(2 * M * K2);
    uint16_t* xb = buffer.data();
#pragma omp parallel if (M >= ZS_BF16_PARALLEL_ROWS && M * N * K >= ZS_BF16_PARALLEL_MACS)
    {
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        convert_rows(x, x_stride, M * id / threads, M * (id + 1) / threads, K, xb);
#pragma omp barrier
        // runs of consecutive groups (one stream of W each) handed out as threads come for them:
        // a thread that another process keeps off its core does not hold up the call
        const int64_t run = threads == 1 ? groups : std::max<int64_t>(1, groups / (8 * threads));
        for (int64_t m0 = 0; m0 < M; m0 += kBf16ChunkRows) {
            const int64_t rows = std::min(kBf16ChunkRows, M - m0);
            const bool last_chunk = m0 + kBf16ChunkRows >= M;  // earlier chunks leave the panels in cache
#pragma omp for schedule(dynamic, run) nowait
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t p = 2 * g, np = std::min<int64_t>(2, panels - p);
                const uint16_t* w = packed + p * panel_elems;
                const bool next_is_mine = g + 1 < groups && (g + 1) % run != 0;  // same run
                const uint16_t* next = next_is_mine ? w + 2 * panel_elems : nullptr;
                const int64_t ncols = std::min(2 * kBf16Panel, N - p * kBf16Panel);
                for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
                    const int64_t pairs = (r0 == 0 && last_chunk && next != nullptr) ? K2 : 0;
                    row_block(std::min<int64_t>(kMaxRows, rows - r0), np, xb + 2 * (m0 + r0) * K2, K2, w, panel_elems,
                              y + (m0 + r0) * N + p * kBf16Panel, N, ncols,
                              bias != nullptr ? bias + p * kBf16Panel : nullptr, next, pairs);
                }
            }
        }
    }
}

}  // extern "C"
