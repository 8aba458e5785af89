// A whole forward step of a Llama-family model for a few tokens, in one call, for the CPU.
//
// Why: at batch 1 a decode step of the default model is ~1,100 small torch calls, and their dispatch and the
// Python between them cost 7-8 ms, a third of the step (benchmarks/NOTES.md). Here every layer runs inside
// one OpenMP parallel region whose phases are shared in chunks (chunks::share in quant_matmul.cpp, in place
// of barriers a descheduled thread would hold up): the weights are read in their GGUF blocks
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
// The LM head stays with the caller (it needs only the sampled rows); the final norm is applied here if asked.
//
// Every output element is summed in an order that depends on the weights' layout alone (never on T or the
// thread count), so results are bitwise independent of batching (design.md, invariant 5).
//
// Built at first use by kernels/decode_step.py through kernels/native_build.py.
#include "quant_matmul.cpp"

#include <stdlib.h>

#include <vector>

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
    int64_t activation_bits;     // 8 or 16: the matmuls' types with integer-activation kernels round x (0: float32)
    // Optional, so that a step needs no small torch ops around it: each costs the engine's loop several times its
    // cost alone, run right after this call streamed the weights through the caches (benchmarks/NOTES.md, session 19).
    const float* final_norm;     // [hidden] or null: x comes back normalized by the model's final norm
    const int64_t* positions;    // [T] or null (then cos/sin are given): cos/sin computed here from
    const float* inv_freq;       // [head_dim / 2], rope's frequencies, as positions * inv_freq * rope_scaling
    float rope_scaling;
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
        // summed here and stored once: the output may be read while a late copy of this chunk runs (chunks::share)
        static thread_local std::vector<float> acc;
        acc.assign((size_t)d, 0.0f);
        for (int64_t p = 0; p < ctx; ++p)
            for (int64_t i = 0; i < d; ++i) acc[i] += s[p] * kv(v_cache, rows[p] + i);
        for (int64_t i = 0; i < d; ++i) out[g * d + i] = acc[i] / total;
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

#ifdef LC_AVX2
inline __m256 exp256(__m256 x) {  // exp512's polynomial on 8 lanes; 2^n built in the exponent bits
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e, _mm256_castsi256_ps(pow2));
}

template <bool BF16>
inline __m256 load_kv8(const void* base, int64_t off) {
    if (BF16) {
        const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)base + off);
}

inline __m256 sum_lanes8x8(const __m256* a) {  // lane j = the sum of a[j]'s lanes
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float max_lanes8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// attend_avx with AVX2, for head_dim D (a multiple of 8): q.k for 8 positions at a time, reduced together by
// sum_lanes8x8; the weighted V sum one head at a time, in slices of up to 64 values (16 ymm registers).
template <bool BF16, int D>
void attend_avx2(const float* q, const void* k_cache, const void* v_cache, const int64_t* rows, int64_t ctx,
                 int64_t group, float scale, float* scores, float* out, float* stats) {
    constexpr int V = D / 8, SLICE = V < 8 ? V : 8;
    static_assert(V % SLICE == 0, "head_dim must be a multiple of 64 or below it");
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * D;
        float* s = scores + g * ctx;
        __m256 maximum = _mm256_set1_ps(-INFINITY);
        for (int64_t start = 0; start < ctx; start += 8) {
            const int n = (int)std::min<int64_t>(8, ctx - start);
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) {
                acc[j] = _mm256_setzero_ps();
                if (j < n)
                    for (int v = 0; v < V; ++v)
                        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * v), load_kv8<BF16>(k_cache, rows[start + j] + 8 * v), acc[j]);
            }
            const __m256i m = lanes_below(n);
            const __m256 sc = _mm256_mul_ps(sum_lanes8x8(acc), vscale);
            _mm256_maskstore_ps(s + start, m, sc);
            maximum = _mm256_blendv_ps(maximum, _mm256_max_ps(maximum, sc), _mm256_castsi256_ps(m));
        }
        const float top = max_lanes8(maximum);
        const __m256 mx = _mm256_set1_ps(top);
        __m256 total = _mm256_setzero_ps();
        for (int64_t start = 0; start < ctx; start += 8) {
            const __m256i m = lanes_below((int)std::min<int64_t>(8, ctx - start));
            const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(s + start, m), mx)), _mm256_castsi256_ps(m));
            _mm256_maskstore_ps(s + start, m, e);
            total = _mm256_add_ps(total, e);
        }
        const float sum = sum_lanes8(total);
        if (stats) stats[2 * g] = top, stats[2 * g + 1] = sum;
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int v0 = 0; v0 < V; v0 += SLICE) {
            __m256 acc[SLICE];
            for (int v = 0; v < SLICE; ++v) acc[v] = _mm256_setzero_ps();
            for (int64_t p = 0; p < ctx; ++p) {
                const __m256 w = _mm256_set1_ps(s[p]);
                for (int v = 0; v < SLICE; ++v) acc[v] = _mm256_fmadd_ps(w, load_kv8<BF16>(v_cache, rows[p] + 8 * (v0 + v)), acc[v]);
            }
            for (int v = 0; v < SLICE; ++v) _mm256_storeu_ps(out + g * D + 8 * (v0 + v), _mm256_mul_ps(acc[v], inv));
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
#elif defined(LC_AVX2)
    if (d == 64) return attend_avx2<BF16, 64>(q, k_cache, v_cache, rows, ctx, group, scale, scores, out, stats);
    if (d == 128) return attend_avx2<BF16, 128>(q, k_cache, v_cache, rows, ctx, group, scale, scores, out, stats);
#endif
    attend_portable<BF16>(q, k_cache, v_cache, rows, ctx, d, group, scale, scores, out, stats);
}

// ---- one step ---------------------------------------------------------------------------------------------

constexpr int64_t MAX_THREADS = 64;
// From this context on, one token's attention is split over the threads by position (attention_split):
// below it, the extra phase costs more than the imbalance of whole KV heads per thread.
constexpr int64_t SPLIT_CONTEXT = 256;
constexpr int64_t PHASES_PER_LAYER = 7;  // qkv, up to three of attention, o, gate/up, down

// Each layer writes buffers of its own, and nothing is written in place: a chunk that runs late (or twice,
// chunks::share) then reads inputs that no later phase has changed, and stores what was stored already.
struct LayerBuffers {
    float *qkv;       // [T, qkv_cols]: the projections as the matmul left them
    float *ready;     // [T, qkv_cols]: q and k normed (Qwen3) and rotated, biases added
    float *attn;      // [T, heads * head_dim]
    float *mid;       // [T, hidden]: the residual stream after attention
    float *act;       // [T, inter]: silu(gate) * up
    float *out;       // [T, hidden]: the residual stream after the layer
    float *partials;  // split attention: [kv_heads, threads] parts of group * (head_dim + 2)
};

struct Sizes {
    int64_t qkv_cols, layer, own;  // floats: one layer's buffers, one thread's own scratch
};

Sizes sizes_of(int64_t T, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, int64_t nt) {
    Sizes z;
    z.qkv_cols = (heads + 2 * kv_heads) * head_dim;
    z.layer = T * (2 * z.qkv_cols + heads * head_dim + 2 * hidden + inter) + heads * nt * (head_dim + 2);
    z.own = T * hidden + T * std::max(2 * inter, hidden) + 2 * head_dim;
    z.layer = (z.layer + 15) / 16 * 16;  // every buffer set starts on a cache line
    z.own = (z.own + 15) / 16 * 16;
    return z;
}

// The scratch: the step's input copied (the caller's x is only written at the end), then every layer's
// buffers, then each thread's own rows (normalized input, matmul outputs before they are combined, one head).
struct Scratch {
    const StepDesc* s;
    Sizes z;
    float* x_in;
    float* layers;
    float* own;

    LayerBuffers layer(int64_t i) const {
        const int64_t T = s->T, d = s->head_dim;
        LayerBuffers b;
        b.qkv = layers + i * z.layer;
        b.ready = b.qkv + T * z.qkv_cols;
        b.attn = b.ready + T * z.qkv_cols;
        b.mid = b.attn + T * s->heads * d;
        b.act = b.mid + T * s->hidden;
        b.out = b.act + T * s->inter;
        b.partials = b.out + T * s->hidden;
        return b;
    }
    const float* input_of(int64_t i) const { return i == 0 ? x_in : layer(i - 1).out; }
};

Scratch carve(const StepDesc& s, int nt) {
    Scratch sc;
    sc.s = &s;
    sc.z = sizes_of(s.T, s.hidden, s.heads, s.kv_heads, s.head_dim, s.inter, nt);
    sc.x_in = s.scratch;
    sc.layers = sc.x_in + (s.T * s.hidden + 15) / 16 * 16;
    sc.own = sc.layers + s.num_layers * sc.z.layer;
    return sc;
}

// One thread's walk through the step's phases: every thread meets the same phases in the same order.
struct Walk {
    const StepDesc& s;
    const Scratch& sc;
    chunks::Board& board;
    int tid, nt;
    float *h, *tmp, *head;  // this thread's own scratch
    int64_t phase = 0;

    template <class Run>
    void run(int n, Run&& fn) {
        chunks::share(board.phase(phase++), n, tid, nt, fn);
    }
    int matmul_chunks() const { return nt * CHUNKS_PER_THREAD; }
};

// The rows [r0, r1) of chunk c (of n) of a weight with `rows` rows of cost `unit`.
inline void chunk_rows(int64_t unit, int64_t rows, int c, int n, int64_t* r0, int64_t* r1) {
    int64_t lo, hi;
    share_of(unit * rows, c, n, &lo, &hi);
    rows_in(0, unit, rows, lo, hi, r0, r1);
}

// Bias, per-head norm and rope of token t's query heads [q0, q1) and KV heads [k0, k1) into `ready`, then those
// KV heads' k and v into the cache. Each head is made in the thread's own `head` and stored once.
void prepare_heads(const Walk& w, const LayerDesc& L, const LayerBuffers& lb, int64_t t, int64_t q0, int64_t q1,
                   int64_t k0, int64_t k1) {
    const StepDesc& s = w.s;
    const int64_t d = s.head_dim, q_cols = s.heads * d, kv_cols = s.kv_heads * d, qkv_cols = q_cols + 2 * kv_cols;
    const float* raw = lb.qkv + t * qkv_cols;
    float* ready = lb.ready + t * qkv_cols;
    const float* c = s.cos + t * (d / 2);
    const float* sn = s.sin + t * (d / 2);
    const float* bias = L.qkv_bias;
    auto head = [&](int64_t at, const float* norm, bool rotate) {
        float* x = w.head;
        memcpy(x, raw + at, (size_t)d * 4);
        if (bias)
            for (int64_t i = 0; i < d; ++i) x[i] += bias[at + i];
        if (norm) rmsnorm(x, norm, d, s.eps, x);
        if (rotate) rope(x, c, sn, d);
        memcpy(ready + at, x, (size_t)d * 4);
    };
    for (int64_t h = q0; h < q1; ++h) head(h * d, L.q_norm, true);
    const int64_t slot = s.slots[t];
    for (int64_t h = k0; h < k1; ++h) {
        const int64_t ka = q_cols + h * d, va = q_cols + kv_cols + h * d;
        head(ka, L.k_norm, true);
        head(va, nullptr, false);
        if (slot < 0) continue;
        const int64_t at = slot * kv_cols + h * d;
        if (s.kv_bf16) {
            for (int64_t i = 0; i < d; ++i) {
                ((uint16_t*)L.k_cache)[at + i] = float_to_bf16_bits(ready[ka + i]);
                ((uint16_t*)L.v_cache)[at + i] = float_to_bf16_bits(ready[va + i]);
            }
        } else {
            memcpy((float*)L.k_cache + at, ready + ka, (size_t)d * 4);
            memcpy((float*)L.v_cache + at, ready + va, (size_t)d * 4);
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


// Token t's attention for KV head g over all its positions.
void attend_item(const StepDesc& s, const LayerDesc& L, const LayerBuffers& lb, int64_t t, int64_t g) {
    const int64_t d = s.head_dim, group = s.heads / s.kv_heads, qkv_cols = (s.heads + 2 * s.kv_heads) * d;
    const int64_t ctx = s.token_ctx[t];
    const AttnScratch a = attn_scratch(group, ctx);
    position_rows(s, t, g, 0, ctx, a.rows);
    attend_any(s, L, lb.ready + t * qkv_cols + g * group * d, a.rows, ctx, a.scores, lb.attn + t * s.heads * d + g * group * d,
               nullptr);
}

// One token over a long context: part p (of nt) of the positions of every KV head is its own chunk, then the
// partial softmaxes are merged: out = sum_p e^(m_p - M) l_p out_p / sum_p e^(m_p - M) l_p, out_p normalized
// within part p.
void attention_split(Walk& w, const LayerDesc& L, const LayerBuffers& lb) {
    const StepDesc& s = w.s;
    const int nt = w.nt;
    const int64_t d = s.head_dim, group = s.heads / s.kv_heads, ctx = s.token_ctx[0];
    const int64_t part = group * (d + 2);  // one (KV head, part) chunk: outputs then (max, sum) per head
    w.run((int)s.kv_heads, [&](int g) { prepare_heads(w, L, lb, 0, g * group, (g + 1) * group, g, g + 1); });
    w.run((int)(s.kv_heads * nt), [&](int item) {
        const int64_t g = item / nt, p = item % nt, p0 = ctx * p / nt, p1 = ctx * (p + 1) / nt;
        if (p1 <= p0) return;
        const AttnScratch a = attn_scratch(group, p1 - p0);
        float* out = lb.partials + (g * nt + p) * part;
        position_rows(s, 0, g, p0, p1, a.rows);
        attend_any(s, L, lb.ready + g * group * d, a.rows, p1 - p0, a.scores, out, out + group * d);
    });
    w.run((int)s.kv_heads, [&](int g) {
        float* o = w.head;  // summed here, stored once
        for (int64_t i = 0; i < group; ++i) {
            float top = -INFINITY, total = 0.0f;
            for (int p = 0; p < nt; ++p)
                if (ctx * (p + 1) / nt > ctx * p / nt) top = std::max(top, lb.partials[(g * nt + p) * part + group * d + 2 * i]);
            for (int64_t k = 0; k < d; ++k) o[k] = 0.0f;
            for (int p = 0; p < nt; ++p) {
                if (ctx * (p + 1) / nt <= ctx * p / nt) continue;
                const float* src = lb.partials + (g * nt + p) * part;
                const float weight = expf(src[group * d + 2 * i] - top) * src[group * d + 2 * i + 1];
                total += weight;
                for (int64_t k = 0; k < d; ++k) o[k] += weight * src[i * d + k];
            }
            float* dst = lb.attn + (g * group + i) * d;
            for (int64_t k = 0; k < d; ++k) dst[k] = o[k] / total;
        }
    });
}

void attention(Walk& w, const LayerDesc& L, const LayerBuffers& lb) {
    const StepDesc& s = w.s;
    const int64_t group = s.heads / s.kv_heads;
    if (s.T == 1 && w.nt > 1 && s.token_ctx[0] >= SPLIT_CONTEXT) {
        attention_split(w, L, lb);
    } else if (s.T == 1) {  // one token: each KV head stores the only K/V it reads anew, then attends
        w.run((int)s.kv_heads, [&](int g) {
            prepare_heads(w, L, lb, 0, g * group, (g + 1) * group, g, g + 1);
            attend_item(s, L, lb, 0, g);
        });
    } else {  // tokens of one sequence read each other's new K/V: all are stored first
        const int n = (int)(s.T * s.kv_heads);
        w.run(n, [&](int item) {
            const int64_t t = item / s.kv_heads, g = item % s.kv_heads;
            prepare_heads(w, L, lb, t, g * group, (g + 1) * group, g, g + 1);
        });
        w.run(n, [&](int item) { attend_item(s, L, lb, item / s.kv_heads, item % s.kv_heads); });
    }
}

inline float silu(float z) { return z / (1.0f + expf(-z)); }

// act[:, r] = silu(gate) * up for chunk c's rows r (gate and up go through this thread's own tmp first).
void gate_up_chunk(const Walk& w, const LayerDesc& L, const LayerBuffers& lb, int c, int n) {
    const StepDesc& s = w.s;
    int64_t r0, r1;
    chunk_rows(unit_of(L.gate, s.T) + unit_of(L.up, s.T), s.inter, c, n, &r0, &r1);
    if (r0 >= r1) return;
    localchat_qweight g = L.gate, u = L.up;
    g.out_col = 0;
    u.out_col = s.inter;
    run_rows(g, r0, r1, w.h, s.T, s.hidden, w.tmp, 2 * s.inter, (int)s.activation_bits);
    run_rows(u, r0, r1, w.h, s.T, s.hidden, w.tmp, 2 * s.inter, (int)s.activation_bits);
    for (int64_t t = 0; t < s.T; ++t) {
        const float* gu = w.tmp + t * 2 * s.inter;
        float* act = lb.act + t * s.inter;
        for (int64_t r = r0; r < r1; ++r) act[r] = silu(gu[r]) * gu[s.inter + r];
    }
}

// out[:, r] = base[:, r] + (in @ W^T)[:, r] for chunk c's rows r of `wt`.
void residual_chunk(const Walk& w, const localchat_qweight& wt, const float* in, int64_t ldin, const float* base, float* out,
                    int c, int n) {
    const StepDesc& s = w.s;
    int64_t r0, r1;
    chunk_rows(unit_of(wt, s.T), wt.rows, c, n, &r0, &r1);
    if (r0 >= r1) return;
    localchat_qweight ww = wt;
    ww.out_col = 0;
    run_rows(ww, r0, r1, in, s.T, ldin, w.tmp, s.hidden, (int)s.activation_bits);
    for (int64_t t = 0; t < s.T; ++t)
        for (int64_t r = r0; r < r1; ++r) out[t * s.hidden + r] = base[t * s.hidden + r] + w.tmp[t * s.hidden + r];
}

// Every thread normalizes the rows itself (a few hundred values a token) rather than waiting for one thread to.
void normalize_rows(const StepDesc& s, const float* x, const float* weight, float* h) {
    for (int64_t t = 0; t < s.T; ++t) rmsnorm(x + t * s.hidden, weight, s.hidden, s.eps, h + t * s.hidden);
}

void layer(Walk& w, int64_t i) {
    const StepDesc& s = w.s;
    const LayerDesc& L = s.layers[i];
    const LayerBuffers lb = w.sc.layer(i);
    const float* x = w.sc.input_of(i);
    const int n = w.matmul_chunks();
    const int64_t d = s.head_dim, qkv_cols = w.sc.z.qkv_cols;
    normalize_rows(s, x, L.attn_norm, w.h);
    localchat_qweight qkv[3] = {L.q, L.k, L.v};
    qkv[0].out_col = 0, qkv[1].out_col = s.heads * d, qkv[2].out_col = (s.heads + s.kv_heads) * d;
    w.run(n, [&](int c) { matmul_chunk(qkv, 3, w.h, s.T, s.hidden, lb.qkv, qkv_cols, c, n, (int)s.activation_bits); });
    attention(w, L, lb);
    w.run(n, [&](int c) { residual_chunk(w, L.o, lb.attn, s.heads * d, x, lb.mid, c, n); });
    normalize_rows(s, lb.mid, L.ffn_norm, w.h);
    w.run(n, [&](int c) { gate_up_chunk(w, L, lb, c, n); });
    w.run(n, [&](int c) { residual_chunk(w, L.down, lb.act, s.inter, lb.mid, lb.out, c, n); });
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

// Floats of scratch a step of T tokens needs on up to `num_threads` threads.
int64_t localchat_step_scratch_floats(int64_t T, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                      int64_t inter, int64_t num_layers, int64_t num_threads) {
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, MAX_THREADS));
    const Sizes z = sizes_of(T, hidden, heads, kv_heads, head_dim, inter, nt);
    return (T * hidden + 15) / 16 * 16 + num_layers * z.layer + nt * z.own;
}

// Runs every layer for the step's T tokens (see the top of this file). Returns 0, or <0 for a description
// that doesn't fit together (-1/-2 a weight's type or shape, -3 a weight's rows, -4 a missing tensor, -5 sizes).
// `scratch` holds localchat_step_scratch_floats(..., num_threads) floats.
int localchat_decode_step(const StepDesc* sp) {
    StepDesc s = *sp;
    if (s.T <= 0) return 0;
    if (s.head_dim <= 0 || s.head_dim % 2 || s.kv_heads <= 0 || s.heads % s.kv_heads || s.block_size <= 0) return -5;
    for (int64_t i = 0; i < s.num_layers; ++i)
        if (int err = check_layer(s, s.layers[i])) return err;
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(s.num_threads, MAX_THREADS));
    std::vector<float> rope_table;
    if (s.positions) {
        if (!s.inv_freq) return -4;
        const int64_t half = s.head_dim / 2;
        rope_table.resize((size_t)(2 * s.T * half));
        for (int64_t t = 0; t < s.T; ++t)
            for (int64_t i = 0; i < half; ++i) {
                const float angle = (float)s.positions[t] * s.inv_freq[i];
                rope_table[t * half + i] = cosf(angle) * s.rope_scaling;
                rope_table[(s.T + t) * half + i] = sinf(angle) * s.rope_scaling;
            }
        s.cos = rope_table.data();
        s.sin = rope_table.data() + s.T * half;
    }
    if (!s.cos || !s.sin) return -4;
    const Scratch sc = carve(s, nt);
    memcpy(sc.x_in, s.x, (size_t)(s.T * s.hidden) * 4);
    chunks::Board& board = chunks::board();
    board.reset(s.num_layers * PHASES_PER_LAYER,
                std::max<int64_t>({(int64_t)nt * CHUNKS_PER_THREAD, s.T * s.kv_heads, s.kv_heads * nt}));
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        float* own = sc.own + (int64_t)tid * sc.z.own;
        Walk w{s, sc, board, tid, omp_get_num_threads(), own, own + s.T * s.hidden,
               own + s.T * s.hidden + s.T * std::max(2 * s.inter, s.hidden)};
        for (int64_t i = 0; i < s.num_layers; ++i) layer(w, i);
    }
    if (s.num_layers > 0) memcpy(s.x, sc.layer(s.num_layers - 1).out, (size_t)(s.T * s.hidden) * 4);
    if (s.final_norm)
        for (int64_t t = 0; t < s.T; ++t) rmsnorm(s.x + t * s.hidden, s.final_norm, s.hidden, s.eps, s.x + t * s.hidden);
    return 0;
}

}  // extern "C"
