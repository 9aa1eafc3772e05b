// zeroserve int8 W8A8 projection for CPUs with AVX512-VNNI (vpdpbusd): y = x W^T + b with W
// quantized per output channel at prepare time and x per token at the start of each call
// (but for each token's two largest channels, kept in fp32 and added in the epilogue).
// kernels/reference/int8.py (torch._int_mm) is its reference: same quantization, same
// rounding, same epilogue order, so the outputs agree bit for bit (the tests check it).
//
// vpdpbusd multiplies unsigned bytes by signed bytes, four at a time into int32 lanes. x's
// int8 values go in shifted to u8 (q + 128) and the shift is taken back in the epilogue with
// comp[n] = 128 * sum_k Wq[n, k], computed at pack time:
//     sum_k (xq_k + 128) Wq[n, k] - comp[n] = sum_k xq_k Wq[n, k]        (exact in int32)
//
// Layout of the packed weight (zs_i8_pack): 16-column panels, K in steps of 4 (zero-padded),
// four panels interleaved per group so that a group is one sequential stream:
//     group g = panels 4g .. 4g+3:  [K4][np][16 columns][4 k]   (np = 4, fewer in the last)
// One zmm holds 16 columns x 4 k of a panel; x's 4 bytes at k are broadcast to all lanes.
// The micro-kernel keeps MR x NP accumulators (up to 6 rows x 4 panels = 24 zmm): at decode
// sizes it streams the weights (NP independent chains hide vpdpbusd's latency), at prefill
// sizes each loaded panel line feeds 6 rows. The threads split the panels evenly (a thread's
// range may start inside a group); x goes in chunks of rows that stay in L2 (all of a batch
// up to ~450 rows at K = 576), each panel read from memory once per chunk.
//
// Built with -DZS_SCALAR, or on a CPU without AVX512-VNNI, the same algorithm runs on plain
// loops (zs_i8_vnni() says which); the Python side then uses torch._int_mm instead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "zs_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(ZS_SCALAR)
#include <immintrin.h>
#define ZS_I8_VNNI 1
#endif

namespace {

constexpr int64_t kCols = 16;                 // columns per panel
constexpr int64_t kGroup = 4;                 // panels per interleaved group
constexpr int64_t kRows = 6;                  // rows per micro-kernel call
constexpr int64_t kChunkBytes = 256 << 10;   // x rows per pass over the panels: ~1/4 of L2
constexpr int32_t kQmax = 127;
constexpr float kInvQmax = 1.0f / 127.0f;     // the constant kernels/reference/int8.py uses

#ifndef ZS_I8_PREFETCH_HINT
#define ZS_I8_PREFETCH_HINT _MM_HINT_T0
#endif

// The threads share a call only past these sizes: waking torch's sleeping OpenMP threads
// (OMP_WAIT_POLICY=PASSIVE) costs 10-50 us, and one core streams a decode step's 0.3-1.8 MB
// projection in about that (measured on the 2-core VM: one thread is faster for every SmolLM2
// projection at M <= 8 but the lm_head). Past 4 MB of weights, or 16M multiply-adds (~110 us
// of one core's VNNI work), two cores win.
#ifndef ZS_I8_PARALLEL_BYTES
#define ZS_I8_PARALLEL_BYTES (1LL << 22)
#endif
#ifndef ZS_I8_PARALLEL_MACS
#define ZS_I8_PARALLEL_MACS (1LL << 24)
#endif

// The two largest |x_k| of each token stay out of its int8 quantization and are multiplied in
// fp32 against the same int8 weights (in the epilogue). SmolLM2's MLP inputs have tokens whose
// energy sits in one or two channels: quantized with them, every other channel rounds to 0
// (perplexity vs fp32: +14% with everything int8, +2.3% with two kept; see reference/int8.py).
struct RowQuant {
    float scale;     // of the int8 part: its absmax * (1/127)
    int32_t i1, i2;  // the kept channels (i2 = 0 with x2 = 0 when K = 1)
    float x1, x2;    // their values
};

// Rounded as the reference rounds (one torch kernel per product and per sum): the compiler
// would otherwise contract a product and a sum into an fma (g++ does, even with -std=c++17).
inline float rounded(float v) {
    volatile float r = v;
    return r;
}

#ifdef ZS_I8_VNNI
inline __mmask16 lanes(int64_t K, int64_t k) {
    return K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
}
inline __mmask16 without(__mmask16 m, int64_t k, int64_t e) {
    return (e >= k && e < k + 16) ? static_cast<__mmask16>(m & ~(1u << (e - k))) : m;
}
#endif

// max |x_k| over k != e1, e2 (-1: none)
float absmax_excluding(const float* x, int64_t K, int64_t e1, int64_t e2) {
#ifdef ZS_I8_VNNI
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = without(without(lanes(K, k), k, e1), k, e2);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)));
    }
    return _mm512_reduce_max_ps(vmax);
#else
    float a = 0.0f;
    for (int64_t k = 0; k < K; ++k)
        if (k != e1 && k != e2) a = std::max(a, std::fabs(x[k]));
    return a;
#endif
}

// the first k != skip with |x_k| == a (there is one: a came from absmax_excluding)
int64_t first_index_of(const float* x, int64_t K, float a, int64_t skip) {
#ifdef ZS_I8_VNNI
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = without(lanes(K, k), k, skip);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)), va, _CMP_EQ_OQ);
        if (hit) return k + __builtin_ctz(hit);
    }
#else
    for (int64_t k = 0; k < K; ++k)
        if (k != skip && std::fabs(x[k]) == a) return k;
#endif
    return skip == 0 ? 1 : 0;  // only for NaN rows: any other channel
}

// One row of x [K] -> u8 [Kp] (q + 128; the padding and the two kept channels 128, i.e. q = 0)
// and its RowQuant, as reference/int8.py's quantize_tokens: the kept channels are the first
// index of the largest |x_k|, then of the largest of the rest; scale = absmax * (1/127) and
// q = round_even(x * (127 / absmax)) over the others.
void quantize_row(const float* x, int64_t K, int64_t Kp, uint8_t* out, RowQuant* rq) {
    const int64_t i1 = first_index_of(x, K, absmax_excluding(x, K, -1, -1), -1);
    const int64_t i2 = K > 1 ? first_index_of(x, K, absmax_excluding(x, K, i1, -1), i1) : -1;
    const float absmax = absmax_excluding(x, K, i1, i2);
    const float inv = absmax > 0.0f ? static_cast<float>(kQmax) / absmax : 0.0f;
    rq->scale = absmax * kInvQmax;
    rq->i1 = static_cast<int32_t>(i1);
    rq->x1 = x[i1];
    rq->i2 = static_cast<int32_t>(i2 >= 0 ? i2 : 0);
    rq->x2 = i2 >= 0 ? x[i2] : 0.0f;
#ifdef ZS_I8_VNNI
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-kQmax), hi = _mm512_set1_epi32(kQmax), off = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = lanes(K, k);
        // cvtps rounds to nearest even (the MXCSR default), as torch.round does
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv));
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
        _mm512_mask_cvtepi32_storeu_epi8(out + k, m, q);
    }
#else
    for (int64_t k = 0; k < K; ++k) {
        const float q = std::nearbyint(x[k] * inv);  // the default rounding mode: nearest even
        out[k] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(q, -127.0f), 127.0f)) + 128);
    }
#endif
    out[i1] = 128;
    if (i2 >= 0) out[i2] = 128;
    for (int64_t k = K; k < Kp; ++k) out[k] = 128;
}

// The operands of one micro-kernel call: NP panels starting at `w` (panel j at w + 64 j, the
// next k4 step `stride` bytes on), rows of u8 x `xs` bytes apart, output columns n0 ...
struct Tile {
    const uint8_t* x;
    int64_t xs;
    const RowQuant* rq;    // of row 0
    const int8_t* w;
    int64_t stride;
    int64_t K4;
    const int32_t* comp;   // at column n0
    const float* w_scale;  // at column n0
    const float* bias;     // at column n0, or null
    float* y;              // at (row 0, column n0)
    int64_t ys;
    int64_t ncols;         // valid columns of the tile (NP * 16, fewer at the right edge)
    const int8_t* prefetch;  // the next tile's panels (null: none, or already in cache)
};

#ifdef ZS_I8_VNNI
// Wq[n, k] of panel j's 16 columns as floats: byte k % 4 of each lane of the line at k / 4
inline __m512 weight_at(const Tile& t, int j, int32_t k) {
    const __m512i line = _mm512_loadu_si512(t.w + (k >> 2) * t.stride + 64 * j);
    const __m512i w = _mm512_srai_epi32(_mm512_sllv_epi32(line, _mm512_set1_epi32(8 * (3 - (k & 3)))), 24);
    return _mm512_cvtepi32_ps(w);
}

template <int MR, int NP>
__attribute__((noinline)) void micro_kernel(const Tile& t) {
    __m512i acc[MR][NP];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_si512();
    const uint8_t* x = t.x;
    const int8_t* w = t.w;
    // the first row block of a pass streams the weights: it prefetches the next tile's lines,
    // as many per k step as it loads, so they arrive under this tile's arithmetic
    const int8_t* pf = t.prefetch;
    for (int64_t k4 = 0; k4 < t.K4; ++k4, w += t.stride) {
        if (pf != nullptr) {
#pragma GCC unroll 4
            for (int j = 0; j < NP; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * j), ZS_I8_PREFETCH_HINT);
            pf += t.stride;
        }
        __m512i b[NP];
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) b[j] = _mm512_loadu_si512(w + 64 * j);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            int32_t a4;
            std::memcpy(&a4, x + r * t.xs + 4 * k4, 4);
            const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
            for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], a, b[j]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
        const int64_t cols = std::min<int64_t>(kCols, t.ncols - kCols * j);
        if (cols <= 0) break;
        const __mmask16 m = cols == kCols ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
        const __m512i comp = _mm512_loadu_si512(t.comp + kCols * j);
        const __m512 ws = _mm512_loadu_ps(t.w_scale + kCols * j);
        const __m512 bias = t.bias != nullptr ? _mm512_loadu_ps(t.bias + kCols * j) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            // y = acc * (x_s w_s) + (x1 W[:, i1] + x2 W[:, i2]) * w_s + bias, each product and
            // sum rounded on its own as in the reference (the asm keeps them from fusing)
            const RowQuant& q = t.rq[r];
            const __m512 s = _mm512_mul_ps(_mm512_set1_ps(q.scale), ws);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], comp)), s);
            __m512 o1 = _mm512_mul_ps(_mm512_set1_ps(q.x1), weight_at(t, j, q.i1));
            __m512 o2 = _mm512_mul_ps(_mm512_set1_ps(q.x2), weight_at(t, j, q.i2));
            asm("" : "+v"(v), "+v"(o1), "+v"(o2));
            __m512 o = _mm512_add_ps(o1, o2);
            o = _mm512_mul_ps(o, ws);
            asm("" : "+v"(o));
            v = _mm512_add_ps(v, o);
            if (t.bias != nullptr) {
                asm("" : "+v"(v));
                v = _mm512_add_ps(v, bias);
            }
            _mm512_mask_storeu_ps(t.y + r * t.ys + kCols * j, m, v);
        }
    }
}

using Kernel = void (*)(const Tile&);

template <int MR>
constexpr Kernel by_panels(int np) {
    return np == 4 ? micro_kernel<MR, 4> : np == 3 ? micro_kernel<MR, 3> : np == 2 ? micro_kernel<MR, 2> : micro_kernel<MR, 1>;
}

void run_tile(int64_t rows, int np, const Tile& t) {
    switch (rows) {
        case 6: by_panels<6>(np)(t); break;
        case 5: by_panels<5>(np)(t); break;
        case 4: by_panels<4>(np)(t); break;
        case 3: by_panels<3>(np)(t); break;
        case 2: by_panels<2>(np)(t); break;
        default: by_panels<1>(np)(t); break;
    }
}
#else
void run_tile(int64_t rows, int np, const Tile& t) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < std::min<int64_t>(np * kCols, t.ncols); ++c) {
            const int8_t* w = t.w + 64 * (c / kCols) + 4 * (c % kCols);
            const uint8_t* x = t.x + r * t.xs;
            int32_t acc = 0;
            for (int64_t k4 = 0; k4 < t.K4; ++k4)
                for (int64_t i = 0; i < 4; ++i) acc += static_cast<int32_t>(x[4 * k4 + i]) * w[k4 * t.stride + i];
            const RowQuant& q = t.rq[r];
            const float ws = t.w_scale[c];
            const float v = rounded(static_cast<float>(acc - t.comp[c]) * rounded(q.scale * ws));
            const float w1 = w[(q.i1 / 4) * t.stride + q.i1 % 4], w2 = w[(q.i2 / 4) * t.stride + q.i2 % 4];
            const float o = rounded(rounded(rounded(q.x1 * w1) + rounded(q.x2 * w2)) * ws);
            const float y = rounded(v + o);
            t.y[r * t.ys + c] = t.bias != nullptr ? y + t.bias[c] : y;
        }
}
#endif

}  // namespace

extern "C" {

// 1 when the kernels below run on AVX512-VNNI, 0 on the portable loops.
int zs_i8_vnni() {
#ifdef ZS_I8_VNNI
    return 1;
#else
    return 0;
#endif
}

// Wq [N, K] int8 (row-major) into the group layout above, out [ceil(N/16) * ceil(K/4) * 64]
// bytes; comp [ceil(N/16) * 16] = 128 * row sums of Wq (0 in the padding).
void zs_i8_pack(const int8_t* wq, int64_t N, int64_t K, int8_t* out, int32_t* comp) {
    const int64_t P = (N + kCols - 1) / kCols, K4 = (K + 3) / 4, G = (P + kGroup - 1) / kGroup;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 20))
    for (int64_t g = 0; g < G; ++g) {
        const int64_t np = std::min(kGroup, P - g * kGroup);
        int8_t* dst = out + g * kGroup * K4 * 64;
        for (int64_t k4 = 0; k4 < K4; ++k4)
            for (int64_t j = 0; j < np; ++j)
                for (int64_t c = 0; c < kCols; ++c)
                    for (int64_t i = 0; i < 4; ++i) {
                        const int64_t n = (g * kGroup + j) * kCols + c, k = 4 * k4 + i;
                        *dst++ = (n < N && k < K) ? wq[n * K + k] : 0;
                    }
        for (int64_t n = g * kGroup * kCols; n < (g * kGroup + np) * kCols; ++n) {
            int32_t sum = 0;
            if (n < N)
                for (int64_t k = 0; k < K; ++k) sum += wq[n * K + k];
            comp[n] = 128 * sum;
        }
    }
}

// y [M, N] (rows N apart) = dequant(quant(x) Wq^T) + (x's two kept channels) Wq^T w_s + bias. x: [M, K] fp32, rows x_stride
// floats apart. packed/comp from zs_i8_pack; w_scale and bias (or null) padded to
// ceil(N/16) * 16 floats.
void zs_i8_linear(const float* x, int64_t x_stride, int64_t M, int64_t K, const int8_t* packed,
                  const int32_t* comp, const float* w_scale, const float* bias, float* y, int64_t N) {
    if (M <= 0 || N <= 0) return;
    const int64_t P = (N + kCols - 1) / kCols, K4 = (K + 3) / 4, Kp = 4 * K4;
    // x as u8 (rows Kp bytes apart) and each row's RowQuant, in buffers of the calling thread
    // that only grow: a fresh large allocation each call would be page-faulted in each call
    thread_local std::vector<uint8_t> xq_buffer;
    thread_local std::vector<RowQuant> rq_buffer;
    if (static_cast<int64_t>(xq_buffer.size()) < M * Kp) xq_buffer.resize(M * Kp);
    if (static_cast<int64_t>(rq_buffer.size()) < M) rq_buffer.resize(M);
    uint8_t* const xq = xq_buffer.data();
    RowQuant* const rq = rq_buffer.data();
    const bool parallel = N * K >= ZS_I8_PARALLEL_BYTES || M * N * K >= ZS_I8_PARALLEL_MACS;
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) quantize_row(x + m * x_stride, K, Kp, xq + m * Kp, rq + m);
        // (the implicit barrier: every row is quantized before any tile reads it)
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t chunk = std::max<int64_t>(8 * kRows, kChunkBytes / Kp / kRows * kRows);
        const int64_t p0 = P * id / threads, p1 = P * (id + 1) / threads;
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int64_t rows = std::min(chunk, M - m0);
            for (int64_t p = p0; p < p1;) {
                const int64_t g = p / kGroup, j0 = p % kGroup;
                const int64_t np_group = std::min(kGroup, P - g * kGroup);
                const int64_t np = std::min(np_group - j0, p1 - p);
                const int64_t n0 = p * kCols;
                Tile t{};
                t.xs = Kp;
                t.w = packed + g * kGroup * K4 * 64 + j0 * 64;
                t.stride = np_group * 64;
                t.K4 = K4;
                t.comp = comp + n0;
                t.w_scale = w_scale + n0;
                t.bias = bias != nullptr ? bias + n0 : nullptr;
                t.ys = N;
                t.ncols = std::min(np * kCols, N - n0);
                // the next tile of this thread starts where this group ends (same layout
                // when that group is whole; a partial one is prefetched a little past its end)
                const int8_t* next = p + np < p1 ? packed + (g + 1) * kGroup * K4 * 64 : nullptr;
                for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
                    const int64_t m = m0 + r0;
                    t.prefetch = r0 == 0 ? next : nullptr;
                    t.x = xq + m * Kp;
                    t.rq = rq + m;
                    t.y = y + m * N + n0;
                    run_tile(std::min(kRows, rows - r0), static_cast<int>(np), t);
                }
                p += np;
            }
        }
    }
}

}  // extern "C"
