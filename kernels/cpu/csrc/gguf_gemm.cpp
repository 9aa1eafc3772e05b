// zeroserve CPU kernels: projections over GGUF block-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K),
// kept in their blocks at run time, the llama.cpp way: each activation row is quantized to int8
// in blocks of 32 (a scale per block and the block's sum of quants), and every 32-block of
// weights is dotted against it in int32, scaled by d_w * d_x in fp32.
//
// Layout (zs_gguf_pack, once per weight): rows are taken 16 at a time (a tile; the last one
// zero-padded) and each 32-block of a tile is stored as one record
//
//   quants  4-bit: 4 chunks of 64 bytes; chunk c, lane r (4 bytes): byte j holds element 4c + j
//                  of row r in its low nibble and element 16 + 4c + j in its high nibble
//           8-bit: 8 chunks of 64 bytes; chunk c, lane r, byte j: element 4c + j of row r + 128
//   scales  Q4_0/Q4_1/Q8_0: d [16] fp16 (the file's own), Q4_1 also m [16] fp16
//           Q4_K: sc [16] u8, mn [16] u8 (6-bit), and before every 8 records (a superblock)
//                 d [16] fp16, dmin [16] fp16
//
// so a 512-bit register holds 4 consecutive elements of 16 rows per 32-bit lane: vpdpbusd
// against one activation dword broadcast to every lane gives 16 rows' partial dots at once, one
// row per lane, and the epilogue needs no horizontal sums. Weight values, as the file defines
// them (u = stored quant): Q4_0 d (u - 8); Q4_1 d u + m; Q8_0 d (u - 128); Q4_K d sc u - dmin mn.
// The zero points are taken out in integers with the activation block's sum of quants.
//
// The result equals sum_k w_k * xq_k (xq = the int8-rounded activations) up to fp32 rounding:
// the error against fp32 activations is at most sum_k |w_k| * d_x / 2 per output.
//
// With AVX512-VNNI (and BW) the tiles run on vpdpbusd; elsewhere (or with -DZS_SCALAR) the same
// algorithm runs on plain loops over the same layout (zs_gguf_vnni() says which).
//
// Threads: OpenMP (torch's libgomp pool, as in cpu_ops.cpp) over runs of tiles, once a call
// streams more than ZS_GGUF_PARALLEL_BYTES; smaller calls stay on the calling thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "zs_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(ZS_SCALAR)
#include <immintrin.h>
#define ZS_GGUF_VNNI 1
#endif

namespace {

enum GGMLType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12 };

constexpr int64_t kTile = 16;   // rows per tile (one per 32-bit lane of a zmm)
constexpr int64_t kBlock = 32;  // elements per block (a Q4_K superblock is 8 of them)

// Work below this many weight bytes x rows stays on the calling thread: waking the pool's
// sleeping threads (OMP_WAIT_POLICY=PASSIVE) costs more than a small decode projection, and one
// core alone streams a few hundred KB at close to the memory's bandwidth. (At decode, M = 1:
// SmolLM2's gate|up and the lm_head run on every thread, q|k|v, o and down on one; the same
// split as the fp32 GEMM's threshold in cpu_ops.cpp.)
#ifndef ZS_GGUF_PARALLEL_BYTES
#define ZS_GGUF_PARALLEL_BYTES (1 << 20)
#endif

// Rows of activations per pass over a tile: the unpacked weights of a block stay in registers
// and serve all of them.
#ifndef ZS_GGUF_MR
#define ZS_GGUF_MR 4
#endif

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
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

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// --------------------------------------------------------------------------- formats

struct Format {
    int64_t src_block;   // elements per block of the file's type
    int64_t src_bytes;   // bytes per block of the file's type
    int64_t quant_bytes; // bytes of quants per record (16 rows x 32 elements)
    int64_t record;      // bytes per record
    int64_t header;      // Q4_K: bytes of superblock scales before every 8 records
    bool four_bit;
};

inline bool known(int32_t type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0 || type == kQ4_K; }

inline Format format(int32_t type) {
    switch (type) {
        case kQ4_0: return {32, 18, 256, 256 + 32, 0, true};
        case kQ4_1: return {32, 20, 256, 256 + 64, 0, true};
        case kQ8_0: return {32, 34, 512, 512 + 32, 0, false};
        default: return {256, 144, 256, 256 + 32, 64, true};  // Q4_K
    }
}

inline int64_t tile_bytes(const Format& f, int64_t K) {
    const int64_t nb = K / kBlock;
    return nb * f.record + (f.header ? (K / 256) * f.header : 0);
}

// Record of block b in a tile (Q4_K: after its superblock's header).
inline const uint8_t* record_at(const Format& f, const uint8_t* tile, int64_t b) {
    if (f.header == 0) return tile + b * f.record;
    return tile + (b / 8) * (f.header + 8 * f.record) + f.header + (b % 8) * f.record;
}

// Q4_K's 6-bit scale and min of sub-block s from the 12 packed bytes (ggml's get_scale_min_k4).
inline void q4k_scale_min(const uint8_t* q, int s, uint8_t* sc, uint8_t* mn) {
    if (s < 4) {
        *sc = q[s] & 63;
        *mn = q[s + 4] & 63;
    } else {
        *sc = (q[s + 4] & 0xF) | ((q[s - 4] >> 6) << 4);
        *mn = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
    }
}

// The 32 stored quants u of block b of one row of the file (see the header for their meaning).
inline void row_quants(int32_t type, const uint8_t* row, int64_t b, uint8_t* u) {
    switch (type) {
        case kQ4_0:
        case kQ4_1: {
            const uint8_t* qs = row + b * (type == kQ4_0 ? 18 : 20) + (type == kQ4_0 ? 2 : 4);
            for (int i = 0; i < 16; ++i) {
                u[i] = qs[i] & 0xF;
                u[i + 16] = qs[i] >> 4;
            }
            break;
        }
        case kQ8_0: {
            const uint8_t* qs = row + b * 34 + 2;
            for (int i = 0; i < 32; ++i) u[i] = static_cast<uint8_t>(qs[i] ^ 0x80);
            break;
        }
        default: {  // Q4_K: sub-block s of a superblock: 32 bytes of qs (chunk s/2), low or high nibbles
            const int64_t sb = b / 8, s = b % 8;
            const uint8_t* qs = row + sb * 144 + 16 + (s / 2) * 32;
            const int shift = (s % 2) * 4;
            for (int i = 0; i < 32; ++i) u[i] = (qs[i] >> shift) & 0xF;
        }
    }
}

// --------------------------------------------------------------------------- activations

// One row of K floats into int8 blocks of 32: q = round(x / d), d = max|x| / 127; sums[b] is
// the block's sum of quants.
void quantize_row(const float* __restrict x, int64_t K, int8_t* __restrict q, float* __restrict d,
                  int32_t* __restrict sums, float* __restrict dsums) {
    for (int64_t b = 0; b < K / kBlock; ++b) {
        const float* xb = x + b * kBlock;
        int8_t* qb = q + b * kBlock;
#ifdef ZS_GGUF_VNNI
        const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
        const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#else
        float amax = 0.0f;
        for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t s = 0;
        for (int i = 0; i < kBlock; ++i) {
            const int32_t v = static_cast<int32_t>(std::nearbyint(xb[i] * id));
            qb[i] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
            s += qb[i];
        }
        sums[b] = s;
#endif
        d[b] = db;
        dsums[b] = db * static_cast<float>(sums[b]);
    }
}

// --------------------------------------------------------------------------- tiles

// The quantized activations: row r, block b at q + r K + 32 b; d, sum, dsum (= d * sum) at
// [r nb + b].
struct Acts {
    const int8_t* q;
    const float* d;
    const int32_t* sum;
    const float* dsum;
    int64_t K, nb;
    Acts rows_from(int64_t r) const { return {q + r * K, d + r * nb, sum + r * nb, dsum + r * nb, K, nb}; }
};

// y[r][0 : ncols] = the MR activation rows times the tile's 16 rows (+ bias: 16 floats, or null).

#ifdef ZS_GGUF_VNNI

template <int32_t TYPE, int MR>
void tile_rows(const uint8_t* __restrict tile, const Acts& a, float* __restrict y, int64_t ys, int64_t ncols,
               const float* __restrict bias) {
    constexpr bool kFour = TYPE != kQ8_0;
    constexpr bool kMin = TYPE == kQ4_1 || TYPE == kQ4_K;
    constexpr int64_t kQuant = kFour ? 256 : 512;
    const Format f = format(TYPE);
    const __m512i low = _mm512_set1_epi8(0x0F);
    // the min terms go to their own accumulators: one fma chain per accumulator and block
    __m512 acc[MR], accm[MR];
    for (int r = 0; r < MR; ++r) acc[r] = accm[r] = _mm512_setzero_ps();
    __m512 dsup = _mm512_setzero_ps(), msup = _mm512_setzero_ps();
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* rec = record_at(f, tile, b);
        __m512i w[8];  // w[c]: elements 4c .. 4c + 3 of the 16 rows, one row per 32-bit lane
        if (kFour) {
            for (int c = 0; c < 4; ++c) {
                const __m512i raw = _mm512_loadu_si512(rec + 64 * c);
                w[c] = _mm512_and_si512(raw, low);
                w[4 + c] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
        } else {
            for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(rec + 64 * c);
        }
        __m512 d, m = _mm512_setzero_ps();
        if (TYPE == kQ4_K) {
            if (b % 8 == 0) {
                const uint8_t* head = rec - f.header;
                dsup = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head)));
                msup = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + 32)));
            }
            const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + kQuant));
            const __m128i mn = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + kQuant + 16));
            d = _mm512_mul_ps(dsup, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
            m = _mm512_mul_ps(msup, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
        } else {
            d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kQuant)));
            if (TYPE == kQ4_1)
                m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kQuant + 32)));
        }
        for (int r = 0; r < MR; ++r) {
            const int8_t* xb = a.q + r * a.K + b * kBlock;
            auto x4 = [&](int off) {
                int32_t v;
                std::memcpy(&v, xb + off, 4);
                return _mm512_set1_epi32(v);
            };
            // two chains per row: the dependent vpdpbusd latency halves when a single row runs
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            for (int c = 0; c < 4; ++c) {
                a0 = _mm512_dpbusd_epi32(a0, w[c], x4(4 * c));
                a1 = _mm512_dpbusd_epi32(a1, w[4 + c], x4(16 + 4 * c));
            }
            __m512i dot = _mm512_add_epi32(a0, a1);
            const int64_t i = r * a.nb + b;
            if (TYPE == kQ4_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * a.sum[i]));
            if (TYPE == kQ8_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * a.sum[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.d[i])), acc[r]);
            if (kMin) accm[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.dsum[i]), accm[r]);
        }
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << ncols) - 1u);
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
        // Q4_K's min is subtracted (d sc u - dmin mn)
        const __m512 sum = TYPE == kQ4_K ? _mm512_sub_ps(acc[r], accm[r]) : _mm512_add_ps(acc[r], accm[r]);
        _mm512_mask_storeu_ps(y + r * ys, mask, _mm512_add_ps(sum, bv));
    }
}

constexpr bool kVNNI = true;

#else  // plain loops over the same layout

template <int32_t TYPE, int MR>
void tile_rows(const uint8_t* __restrict tile, const Acts& a, float* __restrict y, int64_t ys, int64_t ncols,
               const float* __restrict bias) {
    constexpr bool kFour = TYPE != kQ8_0;
    constexpr int64_t kQuant = kFour ? 256 : 512;
    const Format f = format(TYPE);
    float acc[MR][kTile] = {}, accm[MR][kTile] = {};
    float dsup[kTile] = {}, msup[kTile] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* rec = record_at(f, tile, b);
        float d[kTile], m[kTile];
        if (TYPE == kQ4_K && b % 8 == 0) {
            const uint8_t* head = rec - f.header;
            for (int j = 0; j < kTile; ++j) {
                dsup[j] = half_to_float(load_u16(head + 2 * j));
                msup[j] = half_to_float(load_u16(head + 32 + 2 * j));
            }
        }
        for (int j = 0; j < kTile; ++j) {
            if (TYPE == kQ4_K) {
                d[j] = dsup[j] * static_cast<float>(rec[kQuant + j]);
                m[j] = msup[j] * static_cast<float>(rec[kQuant + 16 + j]);
            } else {
                d[j] = half_to_float(load_u16(rec + kQuant + 2 * j));
                m[j] = TYPE == kQ4_1 ? half_to_float(load_u16(rec + kQuant + 32 + 2 * j)) : 0.0f;
            }
        }
        for (int r = 0; r < MR; ++r) {
            const int8_t* xb = a.q + r * a.K + b * kBlock;
            const int64_t i = r * a.nb + b;
            for (int j = 0; j < kTile; ++j) {
                int32_t dot = 0;
                for (int c = 0; c < (kFour ? 4 : 8); ++c)
                    for (int e = 0; e < 4; ++e) {
                        const uint8_t byte = rec[64 * c + 4 * j + e];
                        if (kFour) {
                            dot += (byte & 0xF) * xb[4 * c + e] + (byte >> 4) * xb[16 + 4 * c + e];
                        } else {
                            dot += byte * xb[4 * c + e];
                        }
                    }
                if (TYPE == kQ4_0) dot -= 8 * a.sum[i];
                if (TYPE == kQ8_0) dot -= 128 * a.sum[i];
                acc[r][j] += static_cast<float>(dot) * (d[j] * a.d[i]);
                accm[r][j] += m[j] * a.dsum[i];
            }
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < ncols; ++j) {
            const float sum = TYPE == kQ4_K ? acc[r][j] - accm[r][j] : acc[r][j] + accm[r][j];
            y[r * ys + j] = sum + (bias != nullptr ? bias[j] : 0.0f);
        }
}

constexpr bool kVNNI = false;

#endif

template <int32_t TYPE>
void tile_block(int64_t rows, const uint8_t* tile, const Acts& a, float* y, int64_t ys, int64_t ncols,
                const float* bias) {
    static_assert(ZS_GGUF_MR >= 1 && ZS_GGUF_MR <= 8, "ZS_GGUF_MR: 1 to 8 rows");
    switch (rows) {
#define ZS_CASE(R) \
    case R: tile_rows<TYPE, (R <= ZS_GGUF_MR ? R : 1)>(tile, a, y, ys, ncols, bias); break;
        ZS_CASE(8)
        ZS_CASE(7)
        ZS_CASE(6)
        ZS_CASE(5)
        ZS_CASE(4)
        ZS_CASE(3)
        ZS_CASE(2)
        default: tile_rows<TYPE, 1>(tile, a, y, ys, ncols, bias); break;
#undef ZS_CASE
    }
}

// Tiles [t0, t1) for every row of the activations, ZS_GGUF_MR rows per pass over a tile (a tile
// is a few KB: the passes after the first find it in L1/L2).
template <int32_t TYPE>
void tiles_range(const uint8_t* packed, int64_t tb, const float* bias, int64_t N, const Acts& a, int64_t M,
                 float* y, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = packed + t * tb;
        const int64_t ncols = std::min(kTile, N - t * kTile);
        for (int64_t r0 = 0; r0 < M; r0 += ZS_GGUF_MR)
            tile_block<TYPE>(std::min<int64_t>(ZS_GGUF_MR, M - r0), tile, a.rows_from(r0), y + r0 * N + t * kTile, N,
                             ncols, bias != nullptr ? bias + t * kTile : nullptr);
    }
}

template <int32_t TYPE>
void gguf_linear(const uint8_t* packed, const float* bias, int64_t N, int64_t K, const float* x, int64_t x_stride,
                 float* y, int64_t M) {
    const Format f = format(TYPE);
    const int64_t nb = K / kBlock, tiles = (N + kTile - 1) / kTile, tb = tile_bytes(f, K);
    // scratch for the quantized activations, kept across calls (one per calling thread)
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> xd, xds;
    thread_local std::vector<int32_t> xsum;
    if (static_cast<int64_t>(xq.size()) < M * K) xq.resize(M * K);
    if (static_cast<int64_t>(xd.size()) < M * nb) {
        xd.resize(M * nb);
        xds.resize(M * nb);
        xsum.resize(M * nb);
    }
    const Acts a{xq.data(), xd.data(), xsum.data(), xds.data(), K, nb};
    int8_t* q = xq.data();
    float *d = xd.data(), *ds = xds.data();
    int32_t* s = xsum.data();
    if (tiles * tb * M < ZS_GGUF_PARALLEL_BYTES || omp_get_max_threads() == 1) {
        // not even an OpenMP region: entering one costs a decode step's small projections
        for (int64_t r = 0; r < M; ++r)
            quantize_row(x + r * x_stride, K, q + r * K, d + r * nb, s + r * nb, ds + r * nb);
        tiles_range<TYPE>(packed, tb, bias, N, a, M, y, 0, tiles);
        return;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; ++r)
            quantize_row(x + r * x_stride, K, q + r * K, d + r * nb, s + r * nb, ds + r * nb);
        // handed out in ~8 runs of tiles per thread: a thread that the OS preempts (the serving
        // processes share these cores) leaves its remaining runs to the others
        const int64_t run = std::max<int64_t>(1, tiles / (8 * omp_get_num_threads()));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t0 = 0; t0 < tiles; t0 += run)
            tiles_range<TYPE>(packed, tb, bias, N, a, M, y, t0, std::min(tiles, t0 + run));
    }
}

}  // namespace

extern "C" {

int zs_gguf_vnni() { return kVNNI ? 1 : 0; }

// Bytes of the packed form of a [N, K] weight of ggml type `type` (0: no kernel for it, or K
// not a whole number of the type's blocks).
int64_t zs_gguf_packed_bytes(int32_t type, int64_t N, int64_t K) {
    if (!known(type) || K <= 0 || N <= 0) return 0;
    const Format f = format(type);
    if (K % f.src_block) return 0;
    return (N + kTile - 1) / kTile * tile_bytes(f, K);
}

// src: uint8 [N, K / block * type_size] (the file's rows) -> out (zs_gguf_packed_bytes bytes).
void zs_gguf_pack(int32_t type, const uint8_t* src, int64_t N, int64_t K, uint8_t* out) {
    const Format f = format(type);
    const int64_t row_bytes = K / f.src_block * f.src_bytes, tiles = (N + kTile - 1) / kTile;
    const int64_t nb = K / kBlock, tb = tile_bytes(f, K), quant = f.quant_bytes;
#pragma omp parallel for schedule(static) if (N * row_bytes >= (1 << 20))
    for (int64_t t = 0; t < tiles; ++t) {
        uint8_t* tile = out + t * tb;
        std::memset(tile, 0, tb);  // padding rows: zero quants and scales, i.e. zero weights
        for (int64_t j = 0; j < kTile && t * kTile + j < N; ++j) {
            const uint8_t* row = src + (t * kTile + j) * row_bytes;
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t* rec = const_cast<uint8_t*>(record_at(f, tile, b));
                uint8_t u[kBlock];
                row_quants(type, row, b, u);
                for (int c = 0; c < (f.four_bit ? 4 : 8); ++c)
                    for (int e = 0; e < 4; ++e)
                        rec[64 * c + 4 * j + e] =
                            f.four_bit ? static_cast<uint8_t>(u[4 * c + e] | (u[16 + 4 * c + e] << 4)) : u[4 * c + e];
                if (type == kQ4_K) {
                    const uint8_t* sb = row + (b / 8) * 144;
                    q4k_scale_min(sb + 4, static_cast<int>(b % 8), rec + quant + j, rec + quant + 16 + j);
                    if (b % 8 == 0) {
                        uint8_t* head = rec - f.header;
                        std::memcpy(head + 2 * j, sb, 2);       // d
                        std::memcpy(head + 32 + 2 * j, sb + 2, 2);  // dmin
                    }
                } else {
                    const uint8_t* blk = row + b * f.src_bytes;
                    std::memcpy(rec + quant + 2 * j, blk, 2);  // d
                    if (type == kQ4_1) std::memcpy(rec + quant + 32 + 2 * j, blk + 2, 2);  // m
                }
            }
        }
    }
}

// y [M, N] = x [M, K] (rows x_stride floats apart) W^T + bias (N floats padded to whole tiles,
// or null), W packed by zs_gguf_pack.
void zs_gguf_linear(int32_t type, const uint8_t* packed, const float* bias, int64_t N, int64_t K, const float* x,
                    int64_t x_stride, float* y, int64_t M) {
    switch (type) {
        case kQ4_0: gguf_linear<kQ4_0>(packed, bias, N, K, x, x_stride, y, M); break;
        case kQ4_1: gguf_linear<kQ4_1>(packed, bias, N, K, x, x_stride, y, M); break;
        case kQ8_0: gguf_linear<kQ8_0>(packed, bias, N, K, x, x_stride, y, M); break;
        case kQ4_K: gguf_linear<kQ4_K>(packed, bias, N, K, x, x_stride, y, M); break;
        default: break;
    }
}

// out [n, K] = the fp32 values of rows ids[0 : n] of src (the file's rows, row_bytes apart),
// exactly as gguf.quants.dequantize computes them (every product of a fp16 scale and a small
// integer is exact in fp32, so a fused multiply-add rounds as the separate ops do).
void zs_gguf_rows(int32_t type, const uint8_t* src, int64_t row_bytes, const int64_t* ids, int64_t n, int64_t K,
                  float* out) {
    const Format f = format(type);
    const int64_t nb = K / kBlock;
#pragma omp parallel for schedule(static) if (n * K >= (1 << 18))
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = src + ids[i] * row_bytes;
        float* o = out + i * K;
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t u[kBlock];
            row_quants(type, row, b, u);
            float* ob = o + b * kBlock;
            switch (type) {
                case kQ4_0: {
                    const float d = half_to_float(load_u16(row + b * f.src_bytes));
                    for (int e = 0; e < kBlock; ++e) ob[e] = d * static_cast<float>(static_cast<int>(u[e]) - 8);
                    break;
                }
                case kQ4_1: {
                    const float d = half_to_float(load_u16(row + b * f.src_bytes));
                    const float m = half_to_float(load_u16(row + b * f.src_bytes + 2));
                    for (int e = 0; e < kBlock; ++e) ob[e] = d * static_cast<float>(u[e]) + m;
                    break;
                }
                case kQ8_0: {
                    const float d = half_to_float(load_u16(row + b * f.src_bytes));
                    for (int e = 0; e < kBlock; ++e) ob[e] = d * static_cast<float>(static_cast<int>(u[e]) - 128);
                    break;
                }
                default: {  // Q4_K
                    const uint8_t* sb = row + (b / 8) * 144;
                    uint8_t sc, mn;
                    q4k_scale_min(sb + 4, static_cast<int>(b % 8), &sc, &mn);
                    const float d = half_to_float(load_u16(sb)) * static_cast<float>(sc);
                    const float m = half_to_float(load_u16(sb + 2)) * static_cast<float>(mn);
                    for (int e = 0; e < kBlock; ++e) ob[e] = d * static_cast<float>(u[e]) - m;
                }
            }
        }
    }
}

}  // extern "C"
