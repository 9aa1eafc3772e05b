// zeroserve CPU kernels (fp32): paged attention over the block pools, and the small fused
// ops around it. Built at first use by kernels/cpu/build.py (g++ -O3 -march=native -fopenmp)
// and called through ctypes with raw pointers; the Python wrappers in kernels/cpu/ops.py
// check shapes, dtypes and contiguity before any pointer gets here.
//
// Threads: OpenMP. The library links libgomp.so.1, the soname of the runtime torch has
// already loaded, so these kernels share torch's thread pool and torch.set_num_threads.
//
// Layouts (see kernels/reference/ops.py for the contracts):
//   q, out          [T, Hq, D]
//   k_cache/v_cache [N, bs, Hkv, D]      token (block b, offset o): row (b*bs + o), Hkv*D floats
//   block_tables    [S, table_stride] int32
//   seq_lens        [S] int32            context length after this step
//   query_start     [S+1] int32          tokens of sequence s: query_start[s] .. query_start[s+1]
//
// With AVX2+FMA (and head_dim % 8 == 0) the inner loops use intrinsics; otherwise (or when
// built with -DZS_SCALAR, which the tests do) the same algorithm runs on plain loops.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <omp.h>

#include "zs_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(ZS_SCALAR)
#include <immintrin.h>
#define ZS_AVX2 1
#endif

namespace {

// Loops run in parallel only when there is enough work to pay for waking the pool's sleeping
// threads (tens of microseconds with OMP_WAIT_POLICY=PASSIVE): a decode step's few hundred KB
// stays on the calling thread.
#ifndef ZS_PARALLEL_FLOATS
#define ZS_PARALLEL_FLOATS (1 << 18)
#endif
constexpr int64_t kParallelFloats = ZS_PARALLEL_FLOATS;

// __builtin_prefetch locality of the attention's look-ahead (3: into L1)
#ifndef ZS_PREFETCH_LOCALITY
#define ZS_PREFETCH_LOCALITY 3
#endif

// exp(x) for x <= 0 (softmax after subtracting the max), without libm: 2^n * p(r) with
// n = round(x / ln2), r = x - n ln2 in two parts (Cody-Waite), p the degree-6 Taylor
// polynomial; relative error ~2e-7 on [-87, 0]; x < -87 gives ~1e-38 (as good as 0).
inline float exp_neg(float x) {
    x = std::max(x, -87.0f);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.3888889e-3f;
    p = p * r + 8.3333333e-3f;
    p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// KV cache element types: fp32, or 16-bit (IEEE half, bfloat16) widened to fp32 as loaded.
struct f16 {
    uint16_t bits;
};
struct bf16 {
    uint16_t bits;
};
enum CacheType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
    const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}
inline float to_float(f16 x) {  // exact, subnormals, infinities and NaN included
    const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
    uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        exponent = 113;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// fp32 -> 16-bit, round to nearest even, as torch converts (bfloat16: NaN -> 0x7fc0, as
// c10::BFloat16 does; half: overflow -> infinity, subnormal halves kept, NaN -> quiet NaN).
inline uint16_t to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, sizeof(x));
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline uint16_t to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, sizeof(x));
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x47800000u)  // >= 65536, infinity or NaN
        return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (x < 0x38800000u) {  // below the smallest normal half: adding 0.5 rounds the subnormal (RNE)
        float t;
        std::memcpy(&t, &x, sizeof(t));
        t += 0.5f;
        uint32_t tb;
        std::memcpy(&tb, &t, sizeof(tb));
        return static_cast<uint16_t>(sign | (tb - 0x3f000000u));
    }
    x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias the exponent (127 -> 15) and round to nearest even
    return static_cast<uint16_t>(sign | (x >> 13));
}

inline void store_row(f16* dst, const float* src, int64_t n) {
    int64_t i = 0;
#if defined(ZS_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) dst[i].bits = to_f16_bits(src[i]);
}
inline void store_row(bf16* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i].bits = to_bf16_bits(src[i]);
}


// The geometry of one attention call, shared by every work item.
template <typename T>
struct Geometry {
    const T* k_cache;
    const T* v_cache;
    int64_t block_size, num_heads, num_kv_heads, group, dim, row_stride;
    float scale;
};

// A block further down the table, fetched a slice at a time while this one is computed on:
// spread over the head loop, the prefetches overlap the arithmetic instead of queueing up.
struct Ahead {
    const char* base = nullptr;
    int64_t bytes = 0;
    void slice(int64_t part, int64_t parts) const {
        if (base == nullptr) return;
        const int64_t lines = (bytes + 63) / 64;
        for (int64_t i = part * lines / parts; i < (part + 1) * lines / parts; ++i) __builtin_prefetch(base + 64 * i, 0, ZS_PREFETCH_LOCALITY);
    }
};

// --------------------------------------------------------------------------- primitives
// scores_block: scores[r][col + o] = scale * q_r . k_o(head of r) for the n tokens of a block
// values_block: acc[r] += sum_o p[r][col + o] * v_o(head of r)
// softmax_row:  p = exp(s - max) in place; returns (max, sum)

#ifdef ZS_AVX2

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// [sum(a0), ..., sum(a7)]
inline __m256 hsum8(const __m256* a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.3888889e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333333e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1666667e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666667e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

template <typename T>
void scores_block(const Geometry<T>& g, const float* __restrict q, const T* __restrict kblk, int64_t n,
                  float* __restrict scores, int64_t ld, int64_t col, const Ahead& ahead) {
    const int64_t nv = g.dim / 8;
    const __m256 scale = _mm256_set1_ps(g.scale);
    const int64_t parts = (n / 8) * g.num_heads;
    int64_t o = 0;
    if (parts == 0) ahead.slice(0, 1);
    for (; o + 8 <= n; o += 8) {  // 8 keys at a time: 8 accumulators, one transpose-add at the end
        const T* k8 = kblk + o * g.row_stride;
        for (int64_t r = 0; r < g.num_heads; ++r) {
            ahead.slice((o / 8) * g.num_heads + r, parts);
            const float* qr = q + r * g.dim;
            const T* k = k8 + (r / g.group) * g.dim;
            __m256 acc[8];
            for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
            for (int64_t i = 0; i < nv; ++i) {
                const __m256 qv = _mm256_loadu_ps(qr + 8 * i);
                for (int t = 0; t < 8; ++t)
                    acc[t] = _mm256_fmadd_ps(qv, load8(k + t * g.row_stride + 8 * i), acc[t]);
            }
            _mm256_storeu_ps(scores + r * ld + col + o, _mm256_mul_ps(hsum8(acc), scale));
        }
    }
    for (; o < n; ++o) {
        const T* k1 = kblk + o * g.row_stride;
        for (int64_t r = 0; r < g.num_heads; ++r) {
            const float* qr = q + r * g.dim;
            const T* k = k1 + (r / g.group) * g.dim;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t i = 0; i < nv; ++i)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * i), load8(k + 8 * i), acc);
            scores[r * ld + col + o] = hsum(acc) * g.scale;
        }
    }
}

inline void softmax_row(float* __restrict s, int64_t n, float* max_out, float* sum_out) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
    float m = hmax(mv);
    for (; t < n; ++t) m = std::max(m, s[t]);
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mb));
        _mm256_storeu_ps(s + t, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; t < n; ++t) {
        s[t] = exp_neg(s[t] - m);
        sum += s[t];
    }
    *max_out = m;
    *sum_out = sum;
}

// acc[0 : 8 NV] += sum_o p[o] v_o[0 : 8 NV]: the accumulators stay in registers over the block
template <int NV, typename T>
inline void weighted_rows(float* __restrict acc, const float* __restrict p, const T* __restrict v,
                          int64_t stride, int64_t n) {
    __m256 a[NV];
    for (int i = 0; i < NV; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
    for (int64_t o = 0; o < n; ++o, v += stride) {
        const __m256 po = _mm256_broadcast_ss(p + o);
        for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(po, load8(v + 8 * i), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

template <typename T>
void values_block(const Geometry<T>& g, float* __restrict acc, const float* __restrict scores, int64_t ld,
                  int64_t col, const T* __restrict vblk, int64_t n, const Ahead& ahead) {
    const int64_t nv = g.dim / 8;
    for (int64_t r = 0; r < g.num_heads; ++r) {
        ahead.slice(r, g.num_heads);
        const float* p = scores + r * ld + col;
        const T* v = vblk + (r / g.group) * g.dim;
        float* a = acc + r * g.dim;
        for (int64_t c = 0; c < nv; c += 8) {
            switch (std::min<int64_t>(8, nv - c)) {
                case 8: weighted_rows<8, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 7: weighted_rows<7, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 6: weighted_rows<6, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 5: weighted_rows<5, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 4: weighted_rows<4, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 3: weighted_rows<3, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                case 2: weighted_rows<2, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
                default: weighted_rows<1, T>(a + 8 * c, p, v + 8 * c, g.row_stride, n); break;
            }
        }
    }
}

constexpr bool kVectorized = true;

#else  // plain loops

template <typename T>
void scores_block(const Geometry<T>& g, const float* __restrict q, const T* __restrict kblk, int64_t n,
                  float* __restrict scores, int64_t ld, int64_t col, const Ahead& ahead) {
    ahead.slice(0, 1);
    for (int64_t o = 0; o < n; ++o) {
        const T* k1 = kblk + o * g.row_stride;
        for (int64_t r = 0; r < g.num_heads; ++r) {
            const float* qr = q + r * g.dim;
            const T* k = k1 + (r / g.group) * g.dim;
            float acc = 0.0f;
            for (int64_t i = 0; i < g.dim; ++i) acc += qr[i] * to_float(k[i]);
            scores[r * ld + col + o] = acc * g.scale;
        }
    }
}

inline void softmax_row(float* __restrict s, int64_t n, float* max_out, float* sum_out) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
        s[t] = exp_neg(s[t] - m);
        sum += s[t];
    }
    *max_out = m;
    *sum_out = sum;
}

template <typename T>
void values_block(const Geometry<T>& g, float* __restrict acc, const float* __restrict scores, int64_t ld,
                  int64_t col, const T* __restrict vblk, int64_t n, const Ahead& ahead) {
    ahead.slice(0, 1);
    for (int64_t r = 0; r < g.num_heads; ++r) {
        const float* p = scores + r * ld + col;
        const T* v = vblk + (r / g.group) * g.dim;
        float* a = acc + r * g.dim;
        for (int64_t o = 0; o < n; ++o)
            for (int64_t i = 0; i < g.dim; ++i) a[i] += p[o] * to_float(v[o * g.row_stride + i]);
    }
}

constexpr bool kVectorized = false;

#endif

// --------------------------------------------------------------------------- attention

#ifndef ZS_PREFETCH_AHEAD
#define ZS_PREFETCH_AHEAD 2
#endif
constexpr int64_t kPrefetchAhead = ZS_PREFETCH_AHEAD;  // blocks

// Every head of one query token over context positions [c0, c1) (c0 a multiple of the block
// size): acc[r] = sum_t exp(s_rt - m_r) v_t (unnormalized), m[r] = max_t s_rt, l[r] = sum_t exp(s_rt - m_r).
// Pass 1 walks the K blocks once (all heads of a block while it is in L1), pass 2 the V blocks.
template <typename T>
void attend_range(const Geometry<T>& g, const float* __restrict q, const int32_t* __restrict table, int64_t c0,
                  int64_t c1, float* __restrict scores, float* __restrict acc, float* __restrict m,
                  float* __restrict l) {
    const int64_t len = c1 - c0, bs = g.block_size, block_floats = bs * g.row_stride;
    // Blocks sit anywhere in the pool: the one kPrefetchAhead further on in the walk (K blocks,
    // then V blocks) is fetched while this one is computed on.
    const int64_t first = c0 / bs, blocks = (c1 + bs - 1) / bs - first;
    auto ahead = [&](int64_t step) {
        Ahead a;
        step += kPrefetchAhead;
        if (step < 2 * blocks) {
            const int64_t b = first + step % blocks;
            const T* pool = step < blocks ? g.k_cache : g.v_cache;
            a.base = reinterpret_cast<const char*>(pool + table[b] * block_floats);
            a.bytes = (std::min(c1, (b + 1) * bs) - b * bs) * g.row_stride * static_cast<int64_t>(sizeof(T));
        }
        return a;
    };
    for (int64_t i = 0; i < blocks; ++i) {
        const int64_t start = (first + i) * bs, n = std::min(bs, c1 - start);
        scores_block(g, q, g.k_cache + table[first + i] * block_floats, n, scores, len, start - c0, ahead(i));
    }
    for (int64_t r = 0; r < g.num_heads; ++r) softmax_row(scores + r * len, len, m + r, l + r);
    std::fill(acc, acc + g.num_heads * g.dim, 0.0f);
    for (int64_t i = 0; i < blocks; ++i) {
        const int64_t start = (first + i) * bs, n = std::min(bs, c1 - start);
        values_block(g, acc, scores, len, start - c0, g.v_cache + table[first + i] * block_floats, n,
                     ahead(blocks + i));
    }
}

// The projections' micro-kernel (below): y[rows][0 : ncols] = x[rows][0 : K] . b, b a panel
// [K][kPanel]; prefill tiles run on it too.
constexpr int64_t kPanel = 16;
void row_block(int64_t rows, const float* x, int64_t xs, const float* b, int64_t K, float* y, int64_t ys,
               int64_t ncols, const float* bias, const char* prefetch, int64_t prefetch_lines);
// A prefill tile's scores and rows per thread are kept within this many floats (1 MiB, half a
// core's L2 here): a long context tiles fewer tokens, and a sequence whose last token alone
// would not fit is attended a token at a time.
constexpr int64_t kTileFloats = int64_t{1} << 18;
// The widened K/V panels of the tiled sequences of one call (256 MiB at most): sequences past
// that are attended a token at a time.
constexpr int64_t kPanelFloats = int64_t{1} << 26;

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// floats of a tile's scratch: per KV head, its rows' queries, scores, outputs, max and sum
inline int64_t tile_floats(int64_t tokens, int64_t context, int64_t group, int64_t dim) {
    return tokens * group * (round_up(context + tokens - 1, kPanel) + 2 * dim + 2);
}

template <typename T>
inline void widen(const T* __restrict src, float* __restrict dst, int64_t n) {
    int64_t i = 0;
#ifdef ZS_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#endif
    for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// A tiled sequence's K and V widened to fp32, per KV head: K transposed, [ld / 16][dim][16],
// then V, [dim_pad / 16][ld][16]; ld is the sequence's length rounded up to a panel.
struct Panels {
    float* base;
    int64_t ld, dim;
    static int64_t head_floats(int64_t ld, int64_t dim) { return ld * (dim + round_up(dim, kPanel)); }
    float* k(int64_t h) const { return base + h * head_floats(ld, dim); }
    float* v(int64_t h) const { return k(h) + ld * dim; }
};

// One KV head of a tiled sequence, positions [p0, p0 + 16), widened into its panels; zero past
// the sequence.
template <typename T>
void fill_panels(const Geometry<T>& g, const int32_t* __restrict table, int64_t seq_len, const Panels& panels,
                 int64_t h, int64_t p0) {
    const int64_t dim = g.dim, dim_pad = round_up(dim, kPanel), bs = g.block_size, ld = panels.ld;
    float* __restrict kt = panels.k(h);
    float* __restrict vp = panels.v(h);
    float krow[512];  // head dims up to 512 (the wrapper sends larger ones to the reference)
    float* kchunk = kt + p0 * dim;
    for (int64_t pos = p0; pos < p0 + kPanel; ++pos) {
        const int64_t o = pos - p0;
        float* vrow = vp + pos * kPanel;
        if (pos >= seq_len) {
            for (int64_t d = 0; d < dim; ++d) kchunk[d * kPanel + o] = 0.0f;
            for (int64_t d0 = 0; d0 < dim_pad; d0 += kPanel)
                std::fill(vrow + d0 * ld, vrow + d0 * ld + kPanel, 0.0f);
            continue;
        }
        const int64_t at = (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * g.row_stride + h * dim;
        widen(g.k_cache + at, krow, dim);
        for (int64_t d = 0; d < dim; ++d) kchunk[d * kPanel + o] = krow[d];
        for (int64_t d0 = 0; d0 < dim_pad; d0 += kPanel) {
            const int64_t n = std::min(kPanel, dim - d0);
            widen(g.v_cache + at + d0, vrow + d0 * ld, n);
            std::fill(vrow + d0 * ld + n, vrow + d0 * ld + kPanel, 0.0f);
        }
    }
}

// KV head h of `tokens` consecutive query tokens of one sequence (a prefill tile), the first
// seeing context positions [0, c1), each next one position more, as matrix products: the rows
// are the tile's tokens x the group's query heads, against the sequence's widened panels
// (fill_panels, once per call for all its tiles), so both products run on the projections'
// 6 x 16 micro-kernel (2 loads and 6 broadcasts per 12 FMAs, where a token alone loads and
// widens a K or V value per FMA). Scores past a row's own context are dropped by its softmax
// (length) and zeroed before P V, where they add exact zeros: with the AVX2 micro-kernel a row's
// result does not depend on the tile it is in, nor on the other heads (tile size, threads,
// tensor-parallel ranks).
template <typename T>
void attend_tile(const Geometry<T>& g, const float* __restrict q, const Panels& panels, int64_t c1, int64_t tokens,
                 int64_t h, float* __restrict scratch, float* __restrict out) {
    const int64_t dim = g.dim, group = g.group, head_floats = g.num_heads * dim;
    const int64_t ld = round_up(c1 + tokens - 1, kPanel), rows = tokens * group;
    float* qh = scratch;         // [rows][dim], pre-scaled
    float* s = qh + rows * dim;  // [rows][ld]
    float* oh = s + rows * ld;   // [rows][dim]
    float* m = oh + rows * dim;  // [rows]
    float* l = m + rows;         // [rows]
    const float* kt = panels.k(h);
    const float* vp = panels.v(h);
    for (int64_t j = 0; j < tokens; ++j)
        for (int64_t i = 0; i < group; ++i) {
            const float* src = q + j * head_floats + (h * group + i) * dim;
            float* dst = qh + (j * group + i) * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = src[d] * g.scale;
        }
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        const int64_t n = std::min<int64_t>(6, rows - r0);
        for (int64_t c = 0; c < ld; c += kPanel)
            row_block(n, qh + r0 * dim, dim, kt + c * dim, dim, s + r0 * ld + c, ld, kPanel, nullptr, nullptr, 0);
    }
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t len = c1 + r / group;
        softmax_row(s + r * ld, len, m + r, l + r);
        std::fill(s + r * ld + len, s + (r + 1) * ld, 0.0f);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        const int64_t n = std::min<int64_t>(6, rows - r0);
        for (int64_t d0 = 0; d0 < dim; d0 += kPanel)
            row_block(n, s + r0 * ld, ld, vp + d0 * panels.ld, ld, oh + r0 * dim + d0, dim,
                      std::min(kPanel, dim - d0), nullptr, nullptr, 0);
    }
    for (int64_t j = 0; j < tokens; ++j)
        for (int64_t i = 0; i < group; ++i) {
            const int64_t r = j * group + i;
            const float inv = 1.0f / l[r];
            float* o = out + j * head_floats + (h * group + i) * dim;
            for (int64_t d = 0; d < dim; ++d) o[d] = oh[r * dim + d] * inv;
        }
}

struct Item {
    int64_t token, seq, c0, c1, partial;  // partial: -1 = write the output directly
    int64_t tokens = 1, kv_head = -1;     // a prefill tile: this many tokens from `token` on, one KV head
};

template <typename T>
void paged_attention(const float* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                     const int32_t* seq_lens, const int32_t* query_start, float* out, int64_t num_seqs,
                     int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                     int64_t table_stride, float scale, int64_t min_split, int64_t query_tile,
                     const int8_t* one_token_prompts) {
    const Geometry<T> g{k_cache, v_cache, block_size, num_heads, num_kv_heads, num_heads / num_kv_heads, head_dim,
                     num_kv_heads * head_dim, scale};
    const int64_t threads = omp_get_max_threads();
    const int64_t want = std::max<int64_t>(1, (2 * threads + num_tokens - 1) / num_tokens);
    min_split = std::max(block_size, round_up(min_split, block_size));

    std::vector<Item> items;
    items.reserve(num_tokens);
    int64_t partials = 0, longest = 1, scratch_floats = 0, panel_floats = 0;
    std::vector<int64_t> panel_at(num_seqs, -1);  // where a tiled sequence's panels start
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t q_end = query_start[s + 1], q_len = q_end - query_start[s];
        const int64_t seq_panels = num_kv_heads * Panels::head_floats(round_up(seq_lens[s], kPanel), head_dim);
        // a prompt's tokens run in tiles, each (tile, KV head) one work item (whatever the
        // threads: a token's result is the same in any tile, so a prompt's last token alone,
        // after a cached prefix, comes out as in its prompt); a decode token alone
        const bool prompt = q_len > 1 || (one_token_prompts != nullptr && one_token_prompts[s] != 0);
        const bool tiled = query_tile > 1 && prompt && head_dim <= 512 &&
                           panel_floats + seq_panels <= kPanelFloats &&
                           tile_floats(1, seq_lens[s], g.group, head_dim) <= kTileFloats;
        if (tiled) {
            panel_at[s] = panel_floats;
            panel_floats += seq_panels;
        }
        for (int64_t t = query_start[s]; t < q_end;) {
            const int64_t context = seq_lens[s] - q_len + (t - query_start[s]) + 1;
            if (context <= 0) {  // nothing visible (not produced by a valid plan): zeros
                std::fill(out + t * num_heads * head_dim, out + (t + 1) * num_heads * head_dim, 0.0f);
                ++t;
                continue;
            }
            if (tiled) {
                int64_t n = std::min(query_tile, q_end - t);
                while (n > 1 && tile_floats(n, context, g.group, head_dim) > kTileFloats) --n;
                for (int64_t h = 0; h < num_kv_heads; ++h) items.push_back({t, s, 0, context, -1, n, h});
                scratch_floats = std::max(scratch_floats, tile_floats(n, context, g.group, head_dim));
                t += n;
                continue;
            }
            const int64_t splits = std::min(want, (context + min_split - 1) / min_split);
            if (splits <= 1) {
                items.push_back({t, s, 0, context, -1});
                longest = std::max(longest, context);
                ++t;
                continue;
            }
            const int64_t chunk = round_up((context + splits - 1) / splits, block_size);
            for (int64_t c0 = 0; c0 < context; c0 += chunk) {
                items.push_back({t, s, c0, std::min(context, c0 + chunk), partials++});
                longest = std::max(longest, chunk);
            }
            ++t;
        }
    }
    const int64_t head_floats = num_heads * head_dim;
    // the tiled sequences' K/V, widened once for all their tiles, 16 positions of one KV head a unit
    const std::unique_ptr<float[]> widened(panel_floats > 0 ? new float[panel_floats] : nullptr);
    auto panels_of = [&](int64_t s) {
        return Panels{widened.get() + panel_at[s], round_up(seq_lens[s], kPanel), head_dim};
    };
    struct Unit {
        int64_t seq, head, p0;
    };
    std::vector<Unit> units;
    for (int64_t s = 0; s < num_seqs; ++s)
        for (int64_t p0 = 0; panel_at[s] >= 0 && p0 < seq_lens[s]; p0 += kPanel)
            for (int64_t h = 0; h < num_kv_heads; ++h) units.push_back({s, h, p0});
    const int64_t unit_count = static_cast<int64_t>(units.size());
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < unit_count; ++u) {
        const Unit& un = units[u];
        fill_panels(g, block_tables + un.seq * table_stride, seq_lens[un.seq], panels_of(un.seq), un.head, un.p0);
    }
    std::vector<float> partial_acc(partials * head_floats), partial_m(partials * num_heads),
        partial_l(partials * num_heads);
    const int64_t count = static_cast<int64_t>(items.size());

#pragma omp parallel
    {
        std::vector<float> scores(num_heads * longest), m(num_heads), l(num_heads);
        const std::unique_ptr<float[]> scratch(scratch_floats > 0 ? new float[scratch_floats] : nullptr);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; ++i) {
            const Item& it = items[i];
            const float* qt = q + it.token * head_floats;
            const int32_t* table = block_tables + it.seq * table_stride;
            if (it.kv_head >= 0) {
                attend_tile(g, qt, panels_of(it.seq), it.c1, it.tokens, it.kv_head, scratch.get(),
                            out + it.token * head_floats);
            } else if (it.partial < 0) {
                float* o = out + it.token * head_floats;
                attend_range(g, qt, table, it.c0, it.c1, scores.data(), o, m.data(), l.data());
                for (int64_t r = 0; r < num_heads; ++r) {
                    const float inv = 1.0f / l[r];
                    for (int64_t d = 0; d < head_dim; ++d) o[r * head_dim + d] *= inv;
                }
            } else {
                attend_range(g, qt, table, it.c0, it.c1, scores.data(), partial_acc.data() + it.partial * head_floats,
                             partial_m.data() + it.partial * num_heads, partial_l.data() + it.partial * num_heads);
            }
        }
    }
    if (partials == 0) return;
    // merge the ranges of each split token: items of one token are consecutive
    for (int64_t i = 0; i < count;) {
        if (items[i].partial < 0) {
            ++i;
            continue;
        }
        int64_t j = i;
        while (j < count && items[j].token == items[i].token) ++j;
        float* o = out + items[i].token * head_floats;
        for (int64_t r = 0; r < num_heads; ++r) {
            float mx = -INFINITY;
            for (int64_t k = i; k < j; ++k) mx = std::max(mx, partial_m[items[k].partial * num_heads + r]);
            float total = 0.0f;
            float* orow = o + r * head_dim;
            std::fill(orow, orow + head_dim, 0.0f);
            for (int64_t k = i; k < j; ++k) {
                const int64_t p = items[k].partial;
                const float w = std::exp(partial_m[p * num_heads + r] - mx);
                total += w * partial_l[p * num_heads + r];
                const float* a = partial_acc.data() + p * head_floats + r * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) orow[d] += w * a[d];
            }
            const float inv = 1.0f / total;
            for (int64_t d = 0; d < head_dim; ++d) orow[d] *= inv;
        }
        i = j;
    }
}



// --------------------------------------------------------------------------- projections
// y [M, N] = x [M, K] W^T + bias, with W packed once into panels of kPanel output columns,
// [N / kPanel][K][kPanel] (the last panel zero-padded): each panel is one contiguous stream,
// read once per chunk of kChunkRows rows of x and used by every 6-row block of the chunk.
// The 6 x 16 micro-kernel keeps 12 accumulators in registers (FMA-bound: 2 panel loads and 6
// broadcasts per 12 FMAs), and its first row block of a chunk prefetches the next panel, one
// cache line per k (a panel is K lines), so the weights stream from memory under the
// arithmetic. Summation is one FMA per k in order, as oneDNN's kernel does for these shapes.

constexpr int64_t kChunkRows = 96;

#ifdef ZS_AVX2
template <int MR>
__attribute__((noinline)) void micro_kernel(const float* __restrict x, int64_t xs, const float* __restrict b,
                                            int64_t K, float* __restrict y, int64_t ys, int64_t ncols,
                                            const float* __restrict bias, const char* prefetch, int64_t prefetch_lines) {
    // Named accumulators and rows written out, not arrays in loops: gcc kept the array form's
    // accumulators on the stack (measured: 29 against 64 GFLOP/s on one core).
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs, *x4 = x + 4 * xs, *x5 = x + 5 * xs;
    auto step = [&](int64_t k) {
        const __m256 b0 = _mm256_loadu_ps(b + k * kPanel), b1 = _mm256_loadu_ps(b + k * kPanel + 8);
        __m256 a = _mm256_broadcast_ss(x0 + k);
        c00 = _mm256_fmadd_ps(a, b0, c00);
        c01 = _mm256_fmadd_ps(a, b1, c01);
        if (MR > 1) {
            a = _mm256_broadcast_ss(x1 + k);
            c10 = _mm256_fmadd_ps(a, b0, c10);
            c11 = _mm256_fmadd_ps(a, b1, c11);
        }
        if (MR > 2) {
            a = _mm256_broadcast_ss(x2 + k);
            c20 = _mm256_fmadd_ps(a, b0, c20);
            c21 = _mm256_fmadd_ps(a, b1, c21);
        }
        if (MR > 3) {
            a = _mm256_broadcast_ss(x3 + k);
            c30 = _mm256_fmadd_ps(a, b0, c30);
            c31 = _mm256_fmadd_ps(a, b1, c31);
        }
        if (MR > 4) {
            a = _mm256_broadcast_ss(x4 + k);
            c40 = _mm256_fmadd_ps(a, b0, c40);
            c41 = _mm256_fmadd_ps(a, b1, c41);
        }
        if (MR > 5) {
            a = _mm256_broadcast_ss(x5 + k);
            c50 = _mm256_fmadd_ps(a, b0, c50);
            c51 = _mm256_fmadd_ps(a, b1, c51);
        }
    };
    int64_t k = 0;
    for (const int64_t kp = std::min(prefetch_lines, K); k < kp; ++k) {
        __builtin_prefetch(prefetch + 64 * k, 0, 2);
        step(k);
    }
    for (; k < K; ++k) step(k);
    __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    if (bias != nullptr) {
        const __m256 d0 = _mm256_loadu_ps(bias), d1 = _mm256_loadu_ps(bias + 8);
        for (int r = 0; r < MR; ++r) {
            acc[r][0] = _mm256_add_ps(acc[r][0], d0);
            acc[r][1] = _mm256_add_ps(acc[r][1], d1);
        }
    }
    if (ncols == kPanel) {
        for (int r = 0; r < MR; ++r) {
            _mm256_storeu_ps(y + r * ys, acc[r][0]);
            _mm256_storeu_ps(y + r * ys + 8, acc[r][1]);
        }
    } else {
        alignas(32) float tmp[kPanel];
        for (int r = 0; r < MR; ++r) {
            _mm256_store_ps(tmp, acc[r][0]);
            _mm256_store_ps(tmp + 8, acc[r][1]);
            std::memcpy(y + r * ys, tmp, ncols * sizeof(float));
        }
    }
}

void row_block(int64_t rows, const float* x, int64_t xs, const float* b, int64_t K, float* y, int64_t ys,
               int64_t ncols, const float* bias, const char* prefetch, int64_t prefetch_lines) {
    switch (rows) {
        case 6: micro_kernel<6>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
        case 5: micro_kernel<5>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
        case 4: micro_kernel<4>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
        case 3: micro_kernel<3>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
        case 2: micro_kernel<2>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
        default: micro_kernel<1>(x, xs, b, K, y, ys, ncols, bias, prefetch, prefetch_lines); break;
    }
}
#else
void row_block(int64_t rows, const float* x, int64_t xs, const float* b, int64_t K, float* y, int64_t ys,
               int64_t ncols, const float* bias, const char*, int64_t) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < ncols; ++j) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc += x[r * xs + k] * b[k * kPanel + j];
            y[r * ys + j] = acc + (bias != nullptr ? bias[j] : 0.0f);
        }
}
#endif

}  // namespace

extern "C" {

int zs_abi_version() { return 5; }

int zs_max_threads() { return omp_get_max_threads(); }

int zs_vectorized() { return kVectorized ? 1 : 0; }

// Causal attention of every query token over its sequence's paged context (prefill, chunked
// prefill after a cached prefix, decode: one loop). Query token i of sequence s sits at
// position seq_lens[s] - q_len(s) + i and sees positions 0 .. that one.
//
// A work item is one token with all its heads (K/V rows are read whole, once), or for a
// prompt's tokens (a sequence with more query tokens than one, or flagged in
// `one_token_prompts`, which may be null) a tile of up to `query_tile` of them and one KV
// head. When there are fewer tokens than ~2 per thread (small decode batches), a token's
// context is also split into ranges of at least `min_split` positions, and the ranges merged
// (flash-decoding).
// cache_type: CacheType of k_cache / v_cache (q and out are fp32).
void zs_paged_attention(const float* q, const void* k_cache, const void* v_cache, int32_t cache_type,
                        const int32_t* block_tables, const int32_t* seq_lens, const int32_t* query_start, float* out,
                        int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t block_size, int64_t table_stride, float scale, int64_t min_split,
                        int64_t query_tile, const int8_t* one_token_prompts) {
#define ZS_ATTEND(T)                                                                                              \
    paged_attention<T>(q, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), block_tables, seq_lens, \
                       query_start, out, num_seqs, num_tokens, num_heads, num_kv_heads, head_dim, block_size,       \
                       table_stride, scale, min_split, query_tile, one_token_prompts)
    switch (cache_type) {
        case kF16: ZS_ATTEND(f16); break;
        case kBF16: ZS_ATTEND(bf16); break;
        default: ZS_ATTEND(float); break;
    }
#undef ZS_ATTEND
}

// --------------------------------------------------------------------------- small ops
// Rows are independent; the loops run in parallel above kParallelFloats of work.


// out = weight * (x' / rms(x')), x' = x (+ residual, stored to residual_out); rows of `hidden`
// floats, x and residual `x_stride` / `res_stride` apart (views of wider tensors are fine).
void zs_rms_norm(const float* x, int64_t x_stride, const float* residual, int64_t res_stride, const float* weight,
                 float* out, float* residual_out, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden >= kParallelFloats)
    for (int64_t t = 0; t < rows; ++t) {
        const float* xr = x + t * x_stride;
        float* o = out + t * hidden;
        const float* src = xr;
        if (residual != nullptr) {
            const float* rr = residual + t * res_stride;
            float* ro = residual_out + t * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) ro[i] = xr[i] + rr[i];
            src = ro;
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; ++i) ss += src[i] * src[i];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (src[i] * inv);
    }
}

// Neox rotary on q [T, Hq, D] and k [T, Hkv, D] (token rows `q_stride` / `k_stride` apart, heads
// contiguous), into q_out [T, Hq, D] and k_out [T, Hkv, D]. cos_sin: [P, D], cos | sin halves.
void zs_rotary(const int64_t* positions, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
               const float* cos_sin, float* q_out, float* k_out, int64_t tokens, int64_t q_heads, int64_t k_heads,
               int64_t dim) {
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * (q_heads + k_heads) * dim >= kParallelFloats)
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos_sin + positions[t] * dim;
        const float* sn = c + half;
        for (int64_t h = 0; h < q_heads + k_heads; ++h) {
            const float* x = h < q_heads ? q + t * q_stride + h * dim : k + t * k_stride + (h - q_heads) * dim;
            float* o = h < q_heads ? q_out + (t * q_heads + h) * dim : k_out + (t * k_heads + h - q_heads) * dim;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = x[i], x2 = x[i + half];
                o[i] = x1 * c[i] - x2 * sn[i];
                o[i + half] = x2 * c[i] + x1 * sn[i];
            }
        }
    }
}

// k/v rows ([T, Hkv*D] fp32, `k_stride` / `v_stride` floats apart) into flat slots of the
// caches, converted to the cache's CacheType as torch's .to() does (round to nearest even;
// fp16: overflow to infinity, subnormals kept); slot < 0: skip.
void zs_write_kv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, void* k_cache, void* v_cache,
                 const int64_t* slots, int64_t tokens, int64_t row, int32_t cache_type) {
    for (int64_t t = 0; t < tokens; ++t) {
        if (slots[t] < 0) continue;
        const float* kr = k + t * k_stride;
        const float* vr = v + t * v_stride;
        switch (cache_type) {
            case kF16:
                store_row(static_cast<f16*>(k_cache) + slots[t] * row, kr, row);
                store_row(static_cast<f16*>(v_cache) + slots[t] * row, vr, row);
                break;
            case kBF16:
                store_row(static_cast<bf16*>(k_cache) + slots[t] * row, kr, row);
                store_row(static_cast<bf16*>(v_cache) + slots[t] * row, vr, row);
                break;
            default:
                std::memcpy(static_cast<float*>(k_cache) + slots[t] * row, kr, row * sizeof(float));
                std::memcpy(static_cast<float*>(v_cache) + slots[t] * row, vr, row * sizeof(float));
                break;
        }
    }
}

// out [n, K] = table rows ids[0..n) (rows `stride` floats apart): the fp32 embedding lookup.
void zs_gather_rows(const float* table, int64_t stride, const int64_t* ids, int64_t n, int64_t K, float* out) {
    for (int64_t t = 0; t < n; ++t) std::memcpy(out + t * K, table + ids[t] * stride, K * sizeof(float));
}

// out [T, I] = silu(x[:, :I]) * x[:, I:], x rows `x_stride` apart.
void zs_silu_and_mul(const float* x, int64_t x_stride, float* out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= kParallelFloats / 8)  // exp: compute-bound
    for (int64_t t = 0; t < rows; ++t) {
        const float* gate = x + t * x_stride;
        const float* up = gate + inter;
        float* o = out + t * inter;
        int64_t i = 0;
#ifdef ZS_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= inter; i += 8) {
            const __m256 gt = _mm256_loadu_ps(gate + i);
            const __m256 e = exp_neg8(_mm256_or_ps(gt, sign));  // exp(-|g|)
            const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e));
            const __m256 sig = _mm256_blendv_ps(pos, _mm256_mul_ps(e, pos), gt);  // g < 0: e / (1 + e)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gt, sig), _mm256_loadu_ps(up + i)));
        }
#endif
        for (; i < inter; ++i) {
            const float gt = gate[i];
            const float e = exp_neg(-std::fabs(gt));  // exp(-|g|), no overflow either way
            const float sig = gt >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            o[i] = gt * sig * up[i];
        }
    }
}

// out[t] = the index of the largest value of row t (the first one on ties; a NaN counts as
// the largest, as in torch.argmax). Rows of `cols` floats, `stride` apart.
int64_t argmax_scalar(const float* r, int64_t cols) {
    float best = r[0];
    int64_t at = 0;
    for (int64_t i = 1; i < cols && !std::isnan(best); ++i) {
        if (r[i] > best || std::isnan(r[i])) {
            best = r[i];
            at = i;
        }
    }
    return at;
}

int64_t argmax_row(const float* r, int64_t cols) {
#ifdef ZS_AVX2
    if (cols >= 8) {  // the max 8 lanes at a time, then the first column holding it
        __m256 mv = _mm256_loadu_ps(r);
        __m256 nan = _mm256_cmp_ps(mv, mv, _CMP_UNORD_Q);
        int64_t j = 8;
        for (; j + 8 <= cols; j += 8) {
            const __m256 v = _mm256_loadu_ps(r + j);
            mv = _mm256_max_ps(mv, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float m = hmax(mv);
        bool has_nan = _mm256_movemask_ps(nan) != 0;
        for (int64_t k = j; k < cols; ++k) {
            has_nan = has_nan || std::isnan(r[k]);
            m = std::max(m, r[k]);
        }
        if (has_nan) return argmax_scalar(r, cols);
        const __m256 mb = _mm256_set1_ps(m);
        int64_t k = 0;
        for (; k + 8 <= cols; k += 8)
            if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + k), mb, _CMP_EQ_OQ)) != 0) break;
        for (; k < cols; ++k)
            if (r[k] == m) return k;
        return 0;  // unreachable: m is one of the values
    }
#endif
    return argmax_scalar(r, cols);
}

void zs_argmax_rows(const float* x, int64_t stride, int64_t rows, int64_t cols, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows * cols >= 4 * kParallelFloats)
    for (int64_t t = 0; t < rows; ++t) out[t] = argmax_row(x + t * stride, cols);
}

// Panels of W [N, K] (row-major) into out [ceil(N / 16)][K][16]; bias [N] (or null) into
// bias_out [ceil(N / 16) * 16], zero-padded.
void zs_pack_linear(const float* w, const float* bias, int64_t N, int64_t K, float* out, float* bias_out) {
    const int64_t panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) if (N * K >= kParallelFloats)
    for (int64_t p = 0; p < panels; ++p) {
        float* dst = out + p * K * kPanel;
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < kPanel; ++j) {
                const int64_t n = p * kPanel + j;
                dst[k * kPanel + j] = n < N ? w[n * K + k] : 0.0f;
            }
    }
    if (bias_out != nullptr)
        for (int64_t n = 0; n < panels * kPanel; ++n) bias_out[n] = (bias != nullptr && n < N) ? bias[n] : 0.0f;
}

// y [M, N] (rows N apart) = x [M, K] (rows x_stride apart) W^T + bias (padded, or null).
void zs_linear(const float* x, int64_t x_stride, const float* packed, const float* bias, float* y, int64_t M,
               int64_t N, int64_t K) {
    const int64_t panels = (N + kPanel - 1) / kPanel, panel_floats = K * kPanel;
    const int64_t panel_lines = panel_floats * static_cast<int64_t>(sizeof(float)) / 64;
#pragma omp parallel if (M * N * K >= 4 * kParallelFloats)
    {
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t p0 = panels * id / threads, p1 = panels * (id + 1) / threads;
        for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
            const int64_t rows = std::min(kChunkRows, M - m0);
            const bool last_chunk = m0 + kChunkRows >= M;  // earlier chunks find the panels in cache
            for (int64_t p = p0; p < p1; ++p) {
                const float* b = packed + p * panel_floats;
                const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(b + panel_floats) : nullptr;
                const int64_t ncols = std::min(kPanel, N - p * kPanel);
                for (int64_t r0 = 0; r0 < rows; r0 += 6) {
                    const int64_t lines = (r0 == 0 && last_chunk && next != nullptr) ? panel_lines : 0;
                    row_block(std::min<int64_t>(6, rows - r0), x + (m0 + r0) * x_stride, x_stride, b, K,
                              y + (m0 + r0) * N + p * kPanel, N, ncols, bias != nullptr ? bias + p * kPanel : nullptr,
                              next, lines);
                }
            }
        }
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------- token bitmask

#if defined(__AVX512F__) && !defined(ZS_SCALAR)
#include <immintrin.h>
#define ZS_AVX512_MASK 1
#endif

namespace {

// Logits r[0, cols) (cols <= 32 * words) where bit j of word w (token 32 w + j) is 0 become
// -inf; the rest are not touched (not even rewritten). A JSON-schema mask is mostly whole
// words: all ones (skipped) and all zeros (one run of -inf stores).
void mask_row(float* r, const int32_t* bits, int64_t cols) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const int64_t whole = cols / 32;
    for (int64_t w = 0; w < whole; ++w) {
        const uint32_t m = static_cast<uint32_t>(bits[w]);
        if (m == 0xffffffffu) continue;
        float* p = r + w * 32;
#ifdef ZS_AVX512_MASK
        const __m512 ninf = _mm512_set1_ps(kNegInf);
        _mm512_mask_storeu_ps(p, static_cast<__mmask16>(~m & 0xffffu), ninf);
        _mm512_mask_storeu_ps(p + 16, static_cast<__mmask16>(~m >> 16), ninf);
#else
        if (m == 0) {
            for (int j = 0; j < 32; ++j) p[j] = kNegInf;
        } else {
            for (int j = 0; j < 32; ++j)
                if (((m >> j) & 1u) == 0) p[j] = kNegInf;
        }
#endif
    }
    const int64_t tail = cols - whole * 32;  // a width that is not a multiple of 32: its last word's low bits
    if (tail > 0) {
        const uint32_t m = static_cast<uint32_t>(bits[whole]);
        float* p = r + whole * 32;
        for (int64_t j = 0; j < tail; ++j)
            if (((m >> j) & 1u) == 0) p[j] = kNegInf;
    }
}

}  // namespace

extern "C" {

// xgrammar's apply_token_bitmask_inplace over `n` rows: logits row (rows ? rows[k] : k), `stride`
// floats apart, masked by bitmask row k (`bits_stride` words apart), over its first `cols`
// columns (the caller passes min(V, 32 * words): columns past the mask are left as they are).
void zs_apply_token_bitmask(float* logits, int64_t stride, const int32_t* bits, int64_t bits_stride,
                            const int64_t* rows, int64_t n, int64_t cols) {
#pragma omp parallel for schedule(static) if (n * cols >= 4 * kParallelFloats)
    for (int64_t k = 0; k < n; ++k)
        mask_row(logits + (rows != nullptr ? rows[k] : k) * stride, bits + k * bits_stride, cols);
}

}  // extern "C"
