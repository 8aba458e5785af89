// Paged decode attention for the CPU: one new query token per sequence, attending over that sequence's
// K/V wherever its block table says the blocks are. K and V are read once, straight from the pool (no
// gather, no float32 copy), with float32 arithmetic; heads that share a KV head (GQA) are done together so
// each K/V row is loaded once per group. Parallel over (sequence, KV head) with OpenMP: the library links
// libgomp.so.1, which resolves to the runtime torch has already loaded, so it shares torch's threads.
//
// Built at first use by kernels/cpu_native.py; torch_ops' PyTorch path computes the same and is the
// reference in tests/test_cpu_native.py.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// Softmax numerators p = e^(s - max) in [0, 1] meet V in the element type, as in PyTorch's CPU flash attention
// (and FlashAttention on GPUs), which rounds them to bfloat16 before the P.V product; the denominator sums
// them unrounded. Doing the same keeps the bfloat16 path's greedy outputs close to transformers'.
inline float round_to_bf16(float x) {  // x finite and >= 0
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &bits, 4);
    return x;
}

struct Float32 {
    using T = float;
    static float load(T x) { return x; }
    static T store(float x) { return x; }
    static float round_weight(float x) { return x; }
};

struct BFloat16 {
    using T = uint16_t;
    static float load(T x) { return bf16_to_float(x); }
    static T store(float x) { return float_to_bf16(x); }
    static float round_weight(float x) { return round_to_bf16(x); }
};

// e^x for x <= 0 (scores minus their maximum). Range reduction x = n ln2 + r with ln2 split in two parts and
// a degree-5 polynomial for e^r (the classic Cephes expf constants), branch-free so loops over it vectorize;
// relative error ~1e-7, and inputs below -87 (which would underflow) are clamped.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return e * scale;
}

struct Scratch {
    float* data = nullptr;
    size_t capacity = 0;
    float* get(size_t n) {
        if (n > capacity) {
            free(data);
            capacity = n + n / 2;
            data = (float*)aligned_alloc(64, ((capacity * sizeof(float) + 63) / 64) * 64);
        }
        return data;
    }
};

thread_local Scratch scratch;

constexpr int MAX_GROUP = 16;
constexpr int MAX_GROUP_AVX = 4;  // the AVX-512 path keeps group x head_dim/16 accumulators in registers

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOCALCHAT_AVX512_BF16 1

// Sixteen accumulators -> one vector whose lane i is the sum of a[i]'s lanes: a transpose-and-add tree,
// 3 shuffle/add ops per token instead of a full horizontal reduction each.
inline __m512 sum_lanes16(const __m512* a) {
    __m512 b[8], c[4];
    for (int j = 0; j < 8; ++j)
        b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    for (int j = 0; j < 4; ++j) {
        const __m512d x = _mm512_castps_pd(b[2 * j]), y = _mm512_castps_pd(b[2 * j + 1]);
        c[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
    const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xdd));
}

inline __m512 bf16x16_to_float(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// attend() for bfloat16 K/V and block sizes that are multiples of 16: q.k as bf16 pair dot products with
// float32 accumulation (vdpbf16ps; products of two bf16 are exact in float32), scores and softmax in float32,
// V converted to float32 and accumulated in registers.
template <int D>
void attend_bf16(const uint16_t* query, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* table,
                 int context, int kv_head, int kv_heads, int group, int block_size, float scale, uint16_t* out) {
    static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
    constexpr int QV = D / 32;  // 32-bf16 vectors per row
    constexpr int AV = D / 16;  // 16-float vectors per row
    const int padded = (context + 15) & ~15;
    float* scores = scratch.get((size_t)group * padded);
    const int64_t row_stride = (int64_t)kv_heads * D;
    const int64_t block_stride = row_stride * block_size;
    const __mmask16 all = 0xffff;
    float sums[MAX_GROUP_AVX];

    for (int g = 0; g < group; ++g) {
        const uint16_t* qrow = query + (int64_t)(kv_head * group + g) * D;
        __m512bh q[QV];
        for (int j = 0; j < QV; ++j) q[j] = (__m512bh)_mm512_loadu_si512(qrow + 32 * j);
        float* s = scores + (int64_t)g * padded;
        __m512 maximum = _mm512_set1_ps(-INFINITY);
        for (int start = 0; start < context; start += 16) {
            const int64_t b = start / block_size;
            const uint16_t* rows = k_cache + table[b] * block_stride + (int64_t)(start % block_size) * row_stride +
                                   (int64_t)kv_head * D;
            __m512 acc[16];
            for (int t = 0; t < 16; ++t) {
                const uint16_t* k = rows + t * row_stride;
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0], (__m512bh)_mm512_loadu_si512(k));
                for (int j = 1; j < QV; ++j) a = _mm512_dpbf16_ps(a, q[j], (__m512bh)_mm512_loadu_si512(k + 32 * j));
                acc[t] = a;
            }
            __m512 v = _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale));
            // Rows past the context are stale slots of the block: they never count.
            const int valid = context - start;
            const __mmask16 m = valid >= 16 ? all : (__mmask16)((1u << valid) - 1);
            v = _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), v);
            maximum = _mm512_max_ps(maximum, v);
            _mm512_storeu_ps(s + start, v);
        }
        const float mx = _mm512_reduce_max_ps(maximum);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int t = 0; t < padded; ++t) {
            const float e = t < context ? exp_nonpositive(s[t] - mx) : 0.0f;
            s[t] = round_to_bf16(e);
            total += e;
        }
        sums[g] = total;
    }

    __m512 acc[MAX_GROUP_AVX][AV];
    for (int g = 0; g < group; ++g)
        for (int j = 0; j < AV; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int start = 0; start < context; start += block_size) {
        const uint16_t* rows = v_cache + table[start / block_size] * block_stride + (int64_t)kv_head * D;
        const int n = context - start < block_size ? context - start : block_size;
        for (int i = 0; i < n; ++i) {
            const uint16_t* vrow = rows + i * row_stride;
            __m512 v[AV];
            for (int j = 0; j < AV; ++j) v[j] = bf16x16_to_float(vrow + 16 * j);
            for (int g = 0; g < group; ++g) {
                const __m512 p = _mm512_set1_ps(scores[(int64_t)g * padded + start + i]);
                for (int j = 0; j < AV; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
            }
        }
    }
    for (int g = 0; g < group; ++g) {
        uint16_t* dst = out + (int64_t)(kv_head * group + g) * D;
        const __m512 inv = _mm512_set1_ps(1.0f / sums[g]);
        for (int j = 0; j < AV; ++j) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[g][j], inv));
            for (int l = 0; l < 16; ++l) dst[16 * j + l] = float_to_bf16(tmp[l]);
        }
    }
}
#endif

// Calls visit(t, row) for t in [0, context) with token t's row of this KV head converted to float32.
template <class E, int D, class Visit>
inline void for_each_row(const typename E::T* cache, const int32_t* table, int context, int kv_head,
                         int64_t row_stride, int block_size, Visit visit) {
    const int64_t block_stride = row_stride * block_size;
    for (int start = 0, b = 0; start < context; start += block_size, ++b) {
        const typename E::T* rows = cache + table[b] * block_stride + (int64_t)kv_head * D;
        const int n = context - start < block_size ? context - start : block_size;
        for (int i = 0; i < n; ++i) {
            const typename E::T* r = rows + i * row_stride;
            float f[D];
#pragma omp simd
            for (int d = 0; d < D; ++d) f[d] = E::load(r[d]);
            visit(start + i, f);
        }
    }
}

// One (sequence, KV head): `group` query heads against `context` tokens.
template <class E, int D>
void attend(const typename E::T* query, const typename E::T* k_cache, const typename E::T* v_cache,
            const int32_t* table, int context, int kv_head, int kv_heads, int group, int block_size, float scale,
            typename E::T* out) {
    using T = typename E::T;
    float* buf = scratch.get((size_t)group * context + (size_t)2 * MAX_GROUP * D);
    float* q = buf;                      // [group][D], pre-scaled
    float* acc = q + MAX_GROUP * D;      // [group][D]
    float* scores = acc + MAX_GROUP * D; // [group][context]
    for (int g = 0; g < group; ++g) {
        const T* src = query + (int64_t)(kv_head * group + g) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) q[g * D + d] = E::load(src[d]) * scale;
    }
    const int64_t row_stride = (int64_t)kv_heads * D;

    // Scores, and their maximum per head.
    float maxima[MAX_GROUP];
    for (int g = 0; g < group; ++g) maxima[g] = -INFINITY;
    for_each_row<E, D>(k_cache, table, context, kv_head, row_stride, block_size, [&](int t, const float* k) {
        for (int g = 0; g < group; ++g) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; ++d) s += q[g * D + d] * k[d];
            scores[(int64_t)g * context + t] = s;
            maxima[g] = s > maxima[g] ? s : maxima[g];
        }
    });
    // Softmax numerators and denominators.
    float sums[MAX_GROUP];
    for (int g = 0; g < group; ++g) {
        float* s = scores + (int64_t)g * context;
        const float m = maxima[g];
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int t = 0; t < context; ++t) {
            const float e = exp_nonpositive(s[t] - m);
            s[t] = E::round_weight(e);
            total += e;
        }
        sums[g] = total;
    }
    // Weighted sum of V.
    for (int g = 0; g < group; ++g)
#pragma omp simd
        for (int d = 0; d < D; ++d) acc[g * D + d] = 0.0f;
    for_each_row<E, D>(v_cache, table, context, kv_head, row_stride, block_size, [&](int t, const float* v) {
        for (int g = 0; g < group; ++g) {
            const float p = scores[(int64_t)g * context + t];
#pragma omp simd
            for (int d = 0; d < D; ++d) acc[g * D + d] += p * v[d];
        }
    });
    for (int g = 0; g < group; ++g) {
        T* dst = out + (int64_t)(kv_head * group + g) * D;
        const float inv = 1.0f / sums[g];
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = E::store(acc[g * D + d] * inv);
    }
}

template <class E, int D>
void run(const void* query, int64_t query_row_stride, const void* k_cache, const void* v_cache,
         const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens, const int64_t* rows,
         int num_seqs, void* out, int64_t out_row_stride, int heads, int kv_heads, int block_size, float scale,
         int num_threads) {
    using T = typename E::T;
    const int group = heads / kv_heads;
    const int items = num_seqs * kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int item = 0; item < items; ++item) {
        const int s = item / kv_heads, h = item % kv_heads;
        const int context = context_lens[s];
        const int64_t row = rows ? rows[s] : s;
        T* dst = (T*)out + row * out_row_stride;
        if (context <= 0) {  // a padding row: attends to nothing
            for (int i = 0; i < group * D; ++i) dst[h * group * D + i] = E::store(0.0f);
            continue;
        }
#ifdef LOCALCHAT_AVX512_BF16
        if constexpr (sizeof(T) == 2) {
            if (block_size % 16 == 0 && group <= MAX_GROUP_AVX) {
                attend_bf16<D>((const T*)query + row * query_row_stride, (const T*)k_cache, (const T*)v_cache,
                               block_tables + s * table_stride, context, h, kv_heads, group, block_size, scale, dst);
                continue;
            }
        }
#endif
        attend<E, D>((const T*)query + row * query_row_stride, (const T*)k_cache, (const T*)v_cache,
                     block_tables + s * table_stride, context, h, kv_heads, group, block_size, scale, dst);
    }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16. query rows and out rows are [heads, head_dim] with head stride head_dim;
// rows (nullable) maps sequence s to its row of query and out. Returns 0, or -1 for an unsupported shape.
extern "C" int localchat_paged_decode(int dtype, const void* query, int64_t query_row_stride, const void* k_cache,
                                      const void* v_cache, const int32_t* block_tables, int64_t table_stride,
                                      const int32_t* context_lens, const int64_t* rows, int num_seqs, void* out,
                                      int64_t out_row_stride, int heads, int kv_heads, int head_dim,
                                      int block_size, float scale, int num_threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP) return -1;
#define LOCALCHAT_RUN(E, D)                                                                                   \
    run<E, D>(query, query_row_stride, k_cache, v_cache, block_tables, table_stride, context_lens, rows,    \
              num_seqs, out, out_row_stride, heads, kv_heads, block_size, scale, num_threads)
    if (dtype == 0 && head_dim == 64) LOCALCHAT_RUN(Float32, 64);
    else if (dtype == 0 && head_dim == 128) LOCALCHAT_RUN(Float32, 128);
    else if (dtype == 1 && head_dim == 64) LOCALCHAT_RUN(BFloat16, 64);
    else if (dtype == 1 && head_dim == 128) LOCALCHAT_RUN(BFloat16, 128);
    else return -1;
#undef LOCALCHAT_RUN
    return 0;
}
