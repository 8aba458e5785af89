// A whole forward step of a Llama-family model for a few tokens, in one call, for the CPU.
//
// Why: at batch 1 a decode step of the default model is ~1,100 small torch calls, and their dispatch and the
// Python between them cost 7-8 ms, a third of the step (benchmarks/NOTES.md). Here every layer runs inside
// one OpenMP parallel region with barriers between its phases: the weights are read in their GGUF blocks
// (quant_matmul.cpp's kernels, included below), K/V are stored into and read from the paged pool through the
// block tables, and the only Python left is one call per step. ctypes releases the GIL during the call.
//
// What one call computes, for T tokens (any mix of sequences and positions: each token names its block-table
// row and how many positions it attends to, so decode rows and short prompt chunks go through the same code):
//   for each layer:  h = rmsnorm(x) * attn_norm
//                    q, k, v = h @ Wq^T, h @ Wk^T, h @ Wv^T (+ bias)   [Qwen2 has the bias]
//                    q, k = rmsnorm of each head * q_norm, k_norm       [Qwen3]
//                    q, k = rotate-half rope with the given cos/sin     [transformers' convention]
//                    store every token's k, v in its slot; then attend: softmax(q.k * scale) . v over the
//                    token's first `ctx` positions of its sequence (float32 scores and sums)
//                    x += attn @ Wo^T
//                    h = rmsnorm(x) * ffn_norm;  x += (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
// The final norm and the LM head stay with the caller (they need only the sampled rows).
//
// Every output element is summed in an order that depends on the weights' layout alone (never on T or the
// thread count), so results are bitwise independent of batching (design.md, invariant 5).
//
// Built at first use by kernels/decode_step.py through kernels/native_build.py.
#include "quant_matmul.cpp"

#include <stdlib.h>

namespace {

struct LayerDesc {
    localchat_qweight q, k, v, o, gate, up, down;  // out_col is ignored: each phase knows where it writes
    const float* attn_norm;  // [hidden]
    const float* ffn_norm;   // [hidden]
    const float* qkv_bias;   // [q_rows + 2 * kv_rows] or null
    const float* q_norm;     // [head_dim] or null
    const float* k_norm;     // [head_dim] or null
    void* k_cache;           // [num_blocks, block_size, kv_heads, head_dim], float32 or bfloat16
    void* v_cache;
};

struct StepDesc {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter;
    float eps, scale;
    const LayerDesc* layers;
    int64_t T;
    float* x;            // [T, hidden], the residual stream, updated in place
    const float* cos;    // [T, head_dim / 2]
    const float* sin;    // [T, head_dim / 2]
    int64_t kv_bf16;     // 1: the caches hold bfloat16 (stored rounded to nearest even), 0: float32
    int64_t block_size;
    const int64_t* slots;        // [T]: block * block_size + offset of each token's new K/V; -1: don't store
    const int32_t* block_tables; // [S, table_stride]
    int64_t table_stride;
    const int32_t* token_table;  // [T]: the block-table row of each token's sequence
    const int32_t* token_ctx;    // [T]: the token attends to positions [0, token_ctx)
    float* scratch;              // step_scratch_floats() floats
    int64_t num_threads;
};

inline float bf16_bits_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// ---- small per-token pieces (a few hundred values each: plain loops) ------------------------------------

void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

void rope(float* head, const float* cos, const float* sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = head[i], b = head[i + half];
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

// ---- attention -------------------------------------------------------------------------------------------

#ifdef LC_AVX512
inline __m512 exp512(__m512 x) {  // e^x for |x| < 87 (scores minus their maximum are <= 0)
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(e, n);
}

template <bool BF16>
inline __m512 load_kv16(const void* base, int64_t off) {
    if (BF16) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float*)base + off);
}
#endif

// out[g] (g < group, D values each) = attention of the group's query heads over `ctx` positions of `table`.
// `rows[p]` is position p's element offset in the cache (block row + kv head), computed once per call.
template <bool BF16>
void attend_portable(const float* q, const void* k_cache, const void* v_cache, const int64_t* rows, int64_t ctx,
                     int64_t d, int64_t group, float scale, float* scores, float* out, float* stats) {
    auto kv = [&](const void* base, int64_t off) {
        return BF16 ? bf16_bits_to_float(((const uint16_t*)base)[off]) : ((const float*)base)[off];
    };
    for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * d;
        float* s = scores + g * ctx;
        float maximum = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < ctx; ++p) {
            float dot = 0.0f;
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * kv(k_cache, rows[p] + i);
            s[p] = dot * scale;
            maximum = s[p] > maximum ? s[p] : maximum;
        }
        for (int64_t p = 0; p < ctx; ++p) total += (s[p] = expf(s[p] - maximum));
        float* o = out + g * d;
        for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
        for (int64_t p = 0; p < ctx; ++p)
            for (int64_t i = 0; i < d; ++i) o[i] += s[p] * kv(v_cache, rows[p] + i);
        for (int64_t i = 0; i < d; ++i) o[i] /= total;
        if (stats) stats[2 * g] = maximum, stats[2 * g + 1] = total;
    }
}

#ifdef LC_AVX512
// The same with AVX-512, for head_dim D (a multiple of 16): q.k for 16 positions at a time as 16 vector
// accumulators reduced together by sum_lanes16 (a transpose-and-add tree: ~1 op per position instead of a
// horizontal reduction each), softmax numerators with exp512, and the weighted V sum for up to H heads at once
// in registers, so each V row is loaded once per H heads.
template <bool BF16, int D, int H>
void attend_avx(const float* q, const void* k_cache, const void* v_cache, const int64_t* rows, int64_t ctx,
                int64_t group, float scale, float* scores, float* out, float* stats) {
    constexpr int V = D / 16;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t g = 0; g < group; ++g) {
        __m512 qv[V];
        for (int v = 0; v < V; ++v) qv[v] = _mm512_loadu_ps(q + g * D + 16 * v);
        float* s = scores + g * ctx;
        __m512 maximum = _mm512_set1_ps(-INFINITY);
        for (int64_t start = 0; start < ctx; start += 16) {
            const int n = (int)std::min<int64_t>(16, ctx - start);
            __m512 acc[16];
            for (int j = 0; j < 16; ++j) {
                acc[j] = _mm512_setzero_ps();
                if (j < n)
                    for (int v = 0; v < V; ++v) acc[j] = _mm512_fmadd_ps(qv[v], load_kv16<BF16>(k_cache, rows[start + j] + 16 * v), acc[j]);
            }
            const __mmask16 m = (__mmask16)((1u << n) - 1u);
            const __m512 sc = _mm512_mul_ps(sum_lanes16(acc), vscale);
            _mm512_mask_storeu_ps(s + start, m, sc);
            maximum = _mm512_mask_max_ps(maximum, m, maximum, sc);
        }
        const float top = _mm512_reduce_max_ps(maximum);
        const __m512 mx = _mm512_set1_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int64_t start = 0; start < ctx; start += 16) {
            const int n = (int)std::min<int64_t>(16, ctx - start);
            const __mmask16 m = (__mmask16)((1u << n) - 1u);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + start), mx));
            _mm512_mask_storeu_ps(s + start, m, e);
            total = _mm512_mask_add_ps(total, m, total, e);
        }
        scores[-1 - g] = _mm512_reduce_add_ps(total);  // the group's sums live just before the scores
        if (stats) stats[2 * g] = top, stats[2 * g + 1] = scores[-1 - g];
    }
    for (int64_t g0 = 0; g0 < group; g0 += H) {
        const int h = (int)std::min<int64_t>(H, group - g0);
        __m512 acc[H][V];
        for (int i = 0; i < H; ++i)
            for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
        for (int64_t p = 0; p < ctx; ++p) {
            __m512 row[V];
            for (int v = 0; v < V; ++v) row[v] = load_kv16<BF16>(v_cache, rows[p] + 16 * v);
            for (int i = 0; i < H; ++i) {
                if (i >= h) break;
                const __m512 w = _mm512_set1_ps(scores[(g0 + i) * ctx + p]);
                for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(w, row[v], acc[i][v]);
            }
        }
        for (int i = 0; i < h; ++i) {
            const __m512 inv = _mm512_set1_ps(1.0f / scores[-1 - (g0 + i)]);
            for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (g0 + i) * D + 16 * v, _mm512_mul_ps(acc[i][v], inv));
        }
    }
}

#endif

template <bool BF16>
void attend(const float* q, const void* k_cache, const void* v_cache, const int64_t* rows, int64_t ctx, int64_t d,
            int64_t group, float scale, float* scores, float* out, float* stats = nullptr) {
#ifdef LC_AVX512
    if (d == 64) return attend_avx<BF16, 64, 4>(q, k_cache, v_cache, rows, ctx, group, scale, scores, out, stats);
    if (d == 128) return attend_avx<BF16, 128, 2>(q, k_cache, v_cache, rows, ctx, group, scale, scores, out, stats);
#endif
    attend_portable<BF16>(q, k_cache, v_cache, rows, ctx, d, group, scale, scores, out, stats);
}

// ---- one step ---------------------------------------------------------------------------------------------

constexpr int64_t MAX_THREADS = 64;
// From this context on, one token's attention is split over the threads by position (attention_split):
// below it, the extra barrier costs more than the imbalance of whole KV heads per thread.
constexpr int64_t SPLIT_CONTEXT = 256;

struct Buffers {
    float *h, *qkv, *attn, *tmp, *act, *partials;
};

Buffers carve(const StepDesc& s, int nt) {
    const int64_t qkv_cols = (s.heads + 2 * s.kv_heads) * s.head_dim;
    Buffers b;
    b.h = s.scratch;  // one [T, hidden] block per thread
    b.qkv = b.h + nt * s.T * s.hidden;
    b.attn = b.qkv + s.T * qkv_cols;
    b.tmp = b.attn + s.T * s.heads * s.head_dim;
    b.act = b.tmp + s.T * s.hidden;
    b.partials = b.act + s.T * 2 * s.inter;  // one token's attention split across threads: heads x (D + 2) each
    return b;
}

// This thread's share [lo, hi) of `total` cost units.
inline void share_of(int64_t total, int tid, int nt, int64_t* lo, int64_t* hi) {
    *lo = (int64_t)((__int128)total * tid / nt);
    *hi = (int64_t)((__int128)total * (tid + 1) / nt);
}

inline int64_t unit_of(const localchat_qweight& w, int64_t T) { return w.row_bytes + (w.cols * T) / 5 + 1; }

// y[:, col(w_i) + r] = x @ W_i^T for this thread's rows of the weights, weight i's columns starting at cols[i].
void matmul_share(const localchat_qweight* ws, const int64_t* cols, int n, const float* x, int64_t T, int64_t ldx,
                  float* y, int64_t ldy, int tid, int nt) {
    int64_t total = 0, before[4], unit[4];
    for (int i = 0; i < n; ++i) {
        unit[i] = unit_of(ws[i], T);
        before[i] = total;
        total += unit[i] * ws[i].rows;
    }
    int64_t lo, hi;
    share_of(total, tid, nt, &lo, &hi);
    for (int i = 0; i < n; ++i) {
        int64_t r0, r1;
        rows_in(before[i], unit[i], ws[i].rows, lo, hi, &r0, &r1);
        if (r0 >= r1) continue;
        localchat_qweight w = ws[i];
        w.out_col = cols[i];
        run_rows(w, r0, r1, x, T, ldx, y, ldy);
    }
}

// Bias, per-head norm and rope of token t's query heads [q0, q1) and KV heads [k0, k1), then those KV heads'
// k and v into the cache.
void prepare_heads(const StepDesc& s, const LayerDesc& L, const Buffers& b, int64_t t, int64_t q0, int64_t q1, int64_t k0,
                   int64_t k1) {
    const int64_t d = s.head_dim, q_cols = s.heads * d, kv_cols = s.kv_heads * d;
    float* row = b.qkv + t * (q_cols + 2 * kv_cols);
    const float* c = s.cos + t * (d / 2);
    const float* sn = s.sin + t * (d / 2);
    auto head = [&](float* x, const float* bias, const float* norm, bool rotate) {
        if (bias)
            for (int64_t i = 0; i < d; ++i) x[i] += bias[i];
        if (norm) rmsnorm(x, norm, d, s.eps, x);
        if (rotate) rope(x, c, sn, d);
    };
    const float* bias = L.qkv_bias;
    for (int64_t h = q0; h < q1; ++h) head(row + h * d, bias ? bias + h * d : nullptr, L.q_norm, true);
    const int64_t slot = s.slots[t];
    for (int64_t h = k0; h < k1; ++h) {
        float* k = row + q_cols + h * d;
        float* v = row + q_cols + kv_cols + h * d;
        head(k, bias ? bias + q_cols + h * d : nullptr, L.k_norm, true);
        head(v, bias ? bias + q_cols + kv_cols + h * d : nullptr, nullptr, false);
        if (slot < 0) continue;
        const int64_t at = slot * kv_cols + h * d;
        if (s.kv_bf16) {
            for (int64_t i = 0; i < d; ++i) {
                ((uint16_t*)L.k_cache)[at + i] = float_to_bf16_bits(k[i]);
                ((uint16_t*)L.v_cache)[at + i] = float_to_bf16_bits(v[i]);
            }
        } else {
            memcpy((float*)L.k_cache + at, k, (size_t)d * 4);
            memcpy((float*)L.v_cache + at, v, (size_t)d * 4);
        }
    }
}

// This thread's scratch for one attention call: the group's sums, its scores, then position offsets.
struct AttnScratch {
    float* scores;
    int64_t* rows;
};

AttnScratch attn_scratch(int64_t group, int64_t ctx) {
    static thread_local float* data = nullptr;
    static thread_local int64_t capacity = 0;  // floats
    const int64_t need = group + group * ctx + 2 * ctx + 2;
    if (need > capacity) {
        free(data);
        capacity = need * 2;
        data = (float*)malloc((size_t)capacity * sizeof(float));
    }
    float* scores = data + group;
    const int64_t rows_at = (group + group * ctx + 1) & ~(int64_t)1;  // 8-byte aligned
    return {scores, (int64_t*)(data + rows_at)};
}

// Offsets in the cache of positions [p0, p1) of token t's sequence, for KV head g (no division per position).
void position_rows(const StepDesc& s, int64_t t, int64_t g, int64_t p0, int64_t p1, int64_t* rows) {
    const int32_t* table = s.block_tables + (int64_t)s.token_table[t] * s.table_stride;
    const int64_t row = s.kv_heads * s.head_dim;
    for (int64_t p = p0, blk = p0 / s.block_size, off = p0 % s.block_size; p < p1; ++p) {
        rows[p - p0] = ((int64_t)table[blk] * s.block_size + off) * row + g * s.head_dim;
        if (++off == s.block_size) off = 0, ++blk;
    }
}

void attend_any(const StepDesc& s, const LayerDesc& L, const float* q, const int64_t* rows, int64_t n, float* scores,
                float* out, float* stats) {
    const int64_t group = s.heads / s.kv_heads;
    if (s.kv_bf16)
        attend<true>(q, L.k_cache, L.v_cache, rows, n, s.head_dim, group, s.scale, scores, out, stats);
    else
        attend<false>(q, L.k_cache, L.v_cache, rows, n, s.head_dim, group, s.scale, scores, out, stats);
}

void attention_phase(const StepDesc& s, const LayerDesc& L, const Buffers& b, int tid, int nt, bool prepare) {
    const int64_t d = s.head_dim, group = s.heads / s.kv_heads;
    const int64_t qkv_cols = (s.heads + 2 * s.kv_heads) * d;
    int64_t max_ctx = 1;
    for (int64_t t = 0; t < s.T; ++t) max_ctx = s.token_ctx[t] > max_ctx ? s.token_ctx[t] : max_ctx;
    const AttnScratch w = attn_scratch(group, max_ctx);
    for (int64_t item = tid; item < s.T * s.kv_heads; item += nt) {
        const int64_t t = item / s.kv_heads, g = item % s.kv_heads, ctx = s.token_ctx[t];
        if (prepare) prepare_heads(s, L, b, t, g * group, (g + 1) * group, g, g + 1);
        position_rows(s, t, g, 0, ctx, w.rows);
        attend_any(s, L, b.qkv + t * qkv_cols + g * group * d, w.rows, ctx, w.scores, b.attn + t * s.heads * d + g * group * d, nullptr);
    }
}

// One token over a long context: each thread takes its share of the positions of every KV head (a few KV
// heads don't divide evenly over the threads), then the partial softmaxes are merged:
// out = sum_p e^(m_p - M) l_p out_p / sum_p e^(m_p - M) l_p, with out_p normalized within part p.
void attention_split(const StepDesc& s, const LayerDesc& L, const Buffers& b, int tid, int nt) {
    const int64_t d = s.head_dim, group = s.heads / s.kv_heads, ctx = s.token_ctx[0];
    for (int64_t g = tid; g < s.kv_heads; g += nt) prepare_heads(s, L, b, 0, g * group, (g + 1) * group, g, g + 1);
#pragma omp barrier
    const int64_t p0 = ctx * tid / nt, p1 = ctx * (tid + 1) / nt;
    const int64_t part = group * (d + 2);  // one (KV head, thread) part: outputs then (max, sum) per head
    if (p1 > p0) {
        const AttnScratch w = attn_scratch(group, p1 - p0);
        for (int64_t g = 0; g < s.kv_heads; ++g) {
            float* out = b.partials + (g * nt + tid) * part;
            position_rows(s, 0, g, p0, p1, w.rows);
            attend_any(s, L, b.qkv + g * group * d, w.rows, p1 - p0, w.scores, out, out + group * d);
        }
    }
#pragma omp barrier
    for (int64_t g = tid; g < s.kv_heads; g += nt) {
        for (int64_t i = 0; i < group; ++i) {
            float top = -INFINITY, total = 0.0f;
            for (int p = 0; p < nt; ++p)
                if (ctx * (p + 1) / nt > ctx * p / nt) top = std::max(top, b.partials[(g * nt + p) * part + group * d + 2 * i]);
            float* o = b.attn + (g * group + i) * d;
            for (int64_t k = 0; k < d; ++k) o[k] = 0.0f;
            for (int p = 0; p < nt; ++p) {
                if (ctx * (p + 1) / nt <= ctx * p / nt) continue;
                const float* src = b.partials + (g * nt + p) * part;
                const float weight = expf(src[group * d + 2 * i] - top) * src[group * d + 2 * i + 1];
                total += weight;
                for (int64_t k = 0; k < d; ++k) o[k] += weight * src[i * d + k];
            }
            for (int64_t k = 0; k < d; ++k) o[k] /= total;
        }
    }
}

inline float silu(float z) { return z / (1.0f + expf(-z)); }

// gate and up rows [r0, r1) for every token, then act = silu(gate) * up for those rows.
void gate_up_share(const StepDesc& s, const LayerDesc& L, const Buffers& b, const float* h, int tid, int nt) {
    const int64_t unit = unit_of(L.gate, s.T) + unit_of(L.up, s.T);
    int64_t lo, hi, r0, r1;
    share_of(unit * s.inter, tid, nt, &lo, &hi);
    rows_in(0, unit, s.inter, lo, hi, &r0, &r1);
    if (r0 >= r1) return;
    localchat_qweight g = L.gate, u = L.up;
    g.out_col = 0;
    u.out_col = s.inter;
    float* gu = b.act;  // [T, 2 * inter]: gate then up
    run_rows(g, r0, r1, h, s.T, s.hidden, gu, 2 * s.inter);
    run_rows(u, r0, r1, h, s.T, s.hidden, gu, 2 * s.inter);
    for (int64_t t = 0; t < s.T; ++t) {
        float* row = gu + t * 2 * s.inter;
        for (int64_t r = r0; r < r1; ++r) row[r] = silu(row[r]) * row[s.inter + r];
    }
}

// x[:, r] += y[:, r] for this thread's output rows r of `w` (the rows it computed).
void residual_share(const StepDesc& s, const localchat_qweight& w, const float* in, int64_t ldin, const Buffers& b, int tid, int nt) {
    const int64_t unit = unit_of(w, s.T);
    int64_t lo, hi, r0, r1;
    share_of(unit * w.rows, tid, nt, &lo, &hi);
    rows_in(0, unit, w.rows, lo, hi, &r0, &r1);
    if (r0 >= r1) return;
    localchat_qweight ww = w;
    ww.out_col = 0;
    run_rows(ww, r0, r1, in, s.T, ldin, b.tmp, s.hidden);
    for (int64_t t = 0; t < s.T; ++t)
        for (int64_t r = r0; r < r1; ++r) s.x[t * s.hidden + r] += b.tmp[t * s.hidden + r];
}

// Every thread normalizes the rows itself (a few hundred values a token) rather than waiting at a barrier for
// one thread to do it: on these shared 2-core machines a barrier costs a whole time slice whenever another
// process has taken one of the cores, so a layer keeps only the barriers its data flow needs.
void normalize_rows(const StepDesc& s, const float* w, float* h) {
    for (int64_t t = 0; t < s.T; ++t) rmsnorm(s.x + t * s.hidden, w, s.hidden, s.eps, h + t * s.hidden);
}

void layer(const StepDesc& s, const LayerDesc& L, const Buffers& b, float* h, int tid, int nt) {
    const int64_t d = s.head_dim, qkv_cols = (s.heads + 2 * s.kv_heads) * d;
    normalize_rows(s, L.attn_norm, h);
    const localchat_qweight qkv[3] = {L.q, L.k, L.v};
    const int64_t cols[3] = {0, s.heads * d, (s.heads + s.kv_heads) * d};
    matmul_share(qkv, cols, 3, h, s.T, s.hidden, b.qkv, qkv_cols, tid, nt);
#pragma omp barrier
    if (s.T == 1 && nt > 1 && s.token_ctx[0] >= SPLIT_CONTEXT) {
        attention_split(s, L, b, tid, nt);
    } else if (s.T == 1) {
        attention_phase(s, L, b, tid, nt, true);  // one token: each item stores the only K/V it reads anew
    } else {
        const int64_t group = s.heads / s.kv_heads;
        for (int64_t item = tid; item < s.T * s.kv_heads; item += nt) {
            const int64_t t = item / s.kv_heads, g = item % s.kv_heads;
            prepare_heads(s, L, b, t, g * group, (g + 1) * group, g, g + 1);
        }
#pragma omp barrier
        attention_phase(s, L, b, tid, nt, false);
    }
#pragma omp barrier
    residual_share(s, L.o, b.attn, s.heads * d, b, tid, nt);
#pragma omp barrier
    normalize_rows(s, L.ffn_norm, h);
    gate_up_share(s, L, b, h, tid, nt);
#pragma omp barrier
    residual_share(s, L.down, b.act, 2 * s.inter, b, tid, nt);
#pragma omp barrier
}

int check_layer(const StepDesc& s, const LayerDesc& L) {
    const int64_t d = s.head_dim;
    const localchat_qweight* ins[] = {&L.q, &L.k, &L.v, &L.gate, &L.up};
    for (const localchat_qweight* w : ins)
        if (int err = check(*w, s.hidden)) return err;
    if (int err = check(L.o, s.heads * d)) return err;
    if (int err = check(L.down, s.inter)) return err;
    if (L.q.rows != s.heads * d || L.k.rows != s.kv_heads * d || L.v.rows != s.kv_heads * d) return -3;
    if (L.o.rows != s.hidden || L.gate.rows != s.inter || L.up.rows != s.inter || L.down.rows != s.hidden) return -3;
    if (!L.attn_norm || !L.ffn_norm || !L.k_cache || !L.v_cache || (!L.q_norm) != (!L.k_norm)) return -4;
    return 0;
}

}  // namespace

extern "C" {

// Floats of scratch a step of T tokens needs (the normalized rows are per thread, up to MAX_THREADS).
int64_t localchat_step_scratch_floats(int64_t T, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                      int64_t inter) {
    return T * ((MAX_THREADS + 1) * hidden + (2 * heads + 2 * kv_heads) * head_dim + 2 * inter) +
           MAX_THREADS * heads * (head_dim + 2);
}

// Runs every layer for the step's T tokens (see the top of this file). Returns 0, or <0 for a description
// that doesn't fit together (-1/-2 a weight's type or shape, -3 a weight's rows, -4 a missing tensor, -5 sizes).
int localchat_decode_step(const StepDesc* sp) {
    const StepDesc& s = *sp;
    if (s.T <= 0) return 0;
    if (s.head_dim <= 0 || s.head_dim % 2 || s.kv_heads <= 0 || s.heads % s.kv_heads || s.block_size <= 0) return -5;
    for (int64_t i = 0; i < s.num_layers; ++i)
        if (int err = check_layer(s, s.layers[i])) return err;
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(s.num_threads, MAX_THREADS));
    const Buffers b = carve(s, nt);
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        float* h = b.h + (int64_t)tid * s.T * s.hidden;  // this thread's normalized rows
        for (int64_t i = 0; i < s.num_layers; ++i) layer(s, s.layers[i], b, h, tid, n);
    }
    return 0;
}

}  // extern "C"
