// The element-wise row kernels of the CPU attention kernels (attention.cpp, relative_attention.cpp): the pieces
// of a row-wise online softmax, the per-element mask parts, dropout and the score-gradient rows. All float32.
//
// attention_rows.cpp compiles each of them for AVX-512, AVX2 and baseline x86-64 (GCC target_clones, picked at
// load time), since the extension is built without -march flags; the callers only see plain functions. A call
// handles one row of at most a few hundred elements, so the call itself costs nothing that matters.
#pragma once

#include <cstdint>

namespace ptm::cpu::attn {

// s = s * scale + bias + toep (bias, toep may be null)
void scores_row(float* s, int64_t n, float scale, const float* bias, const float* toep);
// NaN when any s[j] is NaN.
float max_row(const float* s, int64_t n);
// s = exp(s * a - m); returns the sum. exp of -inf (a masked score) is exactly 0.
float exp_sum_row(float* s, int64_t n, float a, float m);
// s = exp(s * a - m)
void exp_row(float* s, int64_t n, float a, float m);
void scale_row(float* x, int64_t n, float a);
void add_row(float* dst, const float* src, int64_t n);

// The products of a few query rows, for decode (at::mm's dispatch costs more than the math there). Each takes
// nq query rows at once (the heads of a GQA group), so that every key and value row is read once for all of
// them while it is in L1:
// s_g[j] = q_g . k_j over the n keys k_j = k + j * ld (D floats each), for q_g = q + g * lq, s_g = s + g * ls;
void dot_rows(float* s, int64_t ls, const float* q, int64_t lq, int64_t nq, const float* k, int64_t n, int64_t ld,
              int64_t D);
// o_g += sum_j p_g[j] * v_j over the n rows v_j = v + j * ld (D floats each), for o_g = o + g * lo, p_g = p + g * lp.
void axpy_rows(float* o, int64_t lo, const float* p, int64_t lp, int64_t nq, const float* v, int64_t n, int64_t ld,
               int64_t D);

// -inf where the key's segment differs from the query's (whatever the score was, NaN included).
void mask_segments_row(float* s, int64_t n, const int64_t* k_seg, int64_t q_seg);
// -inf where visible[j] is false, NaN scores included (visible: the bytes of a bool array).
void mask_dense_row(float* s, int64_t n, const uint8_t* visible);

// XLNet's segment term: s[j] += same where k_ids[j] == q_id, else other.
void add_segment_term_row(float* s, int64_t n, const int64_t* k_ids, int64_t q_id, float same, float other);
// Its gradient: the sums of ds[j] over the keys of the query's segment (*same) and of the others (*other).
void segment_sums_row(const float* ds, int64_t n, const int64_t* k_ids, int64_t q_id, float* same, float* other);

// dS = P * (dP - delta), written over dp
void ds_row(const float* p, float* dp, int64_t n, float delta);

// Dropout. keep(row, j) = hash(row keys k1, k2, column j) >= threshold (see DropoutRng in attention_common.h).
// p[j] *= keep(j0 + j) / (1 - p)
void dropout_row(float* p, int64_t n, uint32_t k1, uint32_t k2, uint32_t j0, uint32_t threshold,
                 float keep_scale);
// dS = P * (dP * keep / (1 - p) - delta) over dp; P becomes the dropped-out P that multiplied V (for dV).
void ds_row_dropout(float* p, float* dp, int64_t n, float delta, uint32_t k1, uint32_t k2, uint32_t j0,
                    uint32_t threshold, float keep_scale);
// keep[j] for the columns [0, n) of one row.
void dropout_keep_row(bool* keep, int64_t n, uint32_t k1, uint32_t k2, uint32_t threshold);

}  // namespace ptm::cpu::attn
