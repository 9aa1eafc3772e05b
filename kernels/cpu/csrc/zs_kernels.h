// The kernels a CPU graph (graph.cpp) may record, declared once: every source that defines
// one includes this header, so a definition that drifts from its declaration is a compile
// error rather than a wrong call at replay.
#pragma once

#include <cstdint>

extern "C" {

void zs_paged_attention(const float* q, const void* k_cache, const void* v_cache, int32_t cache_type,
                        const int32_t* block_tables, const int32_t* seq_lens, const int32_t* query_start, float* out,
                        int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t block_size, int64_t table_stride, float scale, int64_t min_split,
                        int64_t query_tile, const int8_t* one_token_prompts);
void zs_rms_norm(const float* x, int64_t x_stride, const float* residual, int64_t res_stride, const float* weight,
                 float* out, float* residual_out, int64_t rows, int64_t hidden, float eps);
void zs_rotary(const int64_t* positions, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
               const float* cos_sin, float* q_out, float* k_out, int64_t tokens, int64_t q_heads, int64_t k_heads,
               int64_t dim);
void zs_write_kv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, void* k_cache, void* v_cache,
                 const int64_t* slots, int64_t tokens, int64_t row, int32_t cache_type);
void zs_silu_and_mul(const float* x, int64_t x_stride, float* out, int64_t rows, int64_t inter);
void zs_gather_rows(const float* table, int64_t stride, const int64_t* ids, int64_t n, int64_t K, float* out);
void zs_argmax_rows(const float* x, int64_t stride, int64_t rows, int64_t cols, int64_t* out);
void zs_linear(const float* x, int64_t x_stride, const float* packed, const float* bias, float* y, int64_t M,
               int64_t N, int64_t K);
void zs_gguf_linear(int32_t type, const uint8_t* packed, const float* bias, int64_t N, int64_t K, const float* x,
                    int64_t x_stride, float* y, int64_t M);
void zs_gguf_rows(int32_t type, const uint8_t* src, int64_t row_bytes, const int64_t* ids, int64_t n, int64_t K,
                  float* out);
void zs_i8_linear(const float* x, int64_t x_stride, int64_t M, int64_t K, const int8_t* packed, const int32_t* comp,
                  const float* w_scale, const float* bias, float* y, int64_t N);
void zs_bf16_linear(const float* x, int64_t x_stride, const uint16_t* packed, const float* bias, float* y, int64_t M,
                    int64_t N, int64_t K);

}  // extern "C"
