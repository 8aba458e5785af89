// 8-bit activations for the 32-element block types on AVX2 (included by quant_matmul.cpp, inside its namespace).
//
// Why: without AVX-512's 16-entry register lookup, expanding a 4-bit code to a float takes a widen, a convert
// and a scale per 8 weights, and the matmul is bound by those instructions, not by memory (benchmarks/NOTES.md,
// session 8: ~8 G weights/s a core). Quantizing each 32-element block of x to int8 with one float scale lets a
// block's 32 products be summed exactly in integers (vpmaddubsw + vpmaddwd), ~11 instructions a block instead
// of ~25. It costs accuracy: each x block is rounded to 1/254 of its largest magnitude. `bench quality`
// measures what that does to replies and perplexity; kernels/quant.py says when it is used.
//
// A row of x becomes, for each block b: 32 int8 codes q, its scale d (x ~ d * q) and s = d * sum(q). For a
// weight block w = dw * c + m (c its integer codes, m = 0 or its min), the block's product is
// dw * d * sum(c * q) + m * s: exactly the dequantized weights times the dequantized activations.
//
// Each output sums its blocks in the weight's order with one accumulator, whatever T or the tiling, so batched
// rows stay bitwise the rows alone (quant_matmul.cpp's invariant).

#ifdef LC_AVX2

struct Q8Row {
    const int8_t* q;  // blocks * 32 codes
    const float* d;   // blocks scales
    const float* s;   // blocks scaled sums
};

// Round-to-nearest-even of x * (127 / max|x|) per block, as numpy's rint does in tests/test_quant_matmul.py.
inline void quantize_row_q8(const float* x, int64_t blocks, int8_t* q, float* d, float* s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
        __m256i i[4];
        for (int k = 0; k < 4; ++k)
            i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], _mm256_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        // packs interleave the two 128-bit lanes; the permute puts the 32 codes back in order.
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256((__m256i*)(q + 32 * b), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        d[b] = mx / 127.0f;
        s[b] = d[b] * (float)_mm_cvtsi128_si32(s4);
    }
}

// Byte j = 16 where bit j of `bits` is set: Q5 codes' fifth bits, in element order.
inline __m256i fifth_bit_bytes(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(16));
}

// A block's 16 bytes of nibbles as its 32 codes in element order (low nibbles are elements 0-15).
inline __m256i nibble_codes(const uint8_t* qs) {
    const __m128i v = _mm_loadu_si128((const __m128i*)qs);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1), _mm256_set1_epi8(15));
}

// Eight int32 partial sums of codes (unsigned, < 128) times activations.
inline __m256i dot_u8_s8(__m256i codes, __m256i xq) { return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), _mm256_set1_epi16(1)); }

// Per type: the block's codes as unsigned bytes (Q8_0 is signed and goes through dot_u8_s8 by its sign) and
// the min m of dw * c + m, from the block's (d, m) fp16 pair as block_scales converts it.
struct Q8Q4_0 {
    static inline __m256i dot(const uint8_t* b, __m256i xq) { return dot_u8_s8(nibble_codes(b + 2), xq); }
    static inline float min(float d, float) { return -8.0f * d; }
};
struct Q8Q4_1 {
    static inline __m256i dot(const uint8_t* b, __m256i xq) { return dot_u8_s8(nibble_codes(b + 4), xq); }
    static inline float min(float, float m) { return m; }
};
struct Q8Q5_0 {
    static inline __m256i dot(const uint8_t* b, __m256i xq) {
        return dot_u8_s8(_mm256_or_si256(nibble_codes(b + 6), fifth_bit_bytes(load_u32(b + 2))), xq);
    }
    static inline float min(float d, float) { return -16.0f * d; }
};
struct Q8Q5_1 {
    static inline __m256i dot(const uint8_t* b, __m256i xq) {
        return dot_u8_s8(_mm256_or_si256(nibble_codes(b + 8), fifth_bit_bytes(load_u32(b + 4))), xq);
    }
    static inline float min(float, float m) { return m; }
};
struct Q8Q8_0 {
    static inline __m256i dot(const uint8_t* b, __m256i xq) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(b + 2));
        return dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
    }
    static inline float min(float, float) { return 0.0f; }
};

template <class B> struct Q8Of { using type = void; };
template <> struct Q8Of<TQ4_0> { using type = Q8Q4_0; };
template <> struct Q8Of<TQ4_1> { using type = Q8Q4_1; };
template <> struct Q8Of<TQ5_0> { using type = Q8Q5_0; };
template <> struct Q8Of<TQ5_1> { using type = Q8Q5_1; };
template <> struct Q8Of<TQ8_0> { using type = Q8Q8_0; };

constexpr int PREFETCH_GROUPS = 4;

// R consecutive weight rows against TT quantized rows of x.
template <class B, int TT, int R>
inline void rows_q8(const uint8_t* rows, int64_t row_bytes, int64_t blocks, const Q8Row* x, float* y, int64_t ldy) {
    using K = typename Q8Of<B>::type;
    constexpr int RUN = 64;
    alignas(32) float scale[R][2 * RUN];
    __m256 acc[R][TT];
    float mins[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps(), mins[r][t] = 0.0f;
    for (int64_t b0 = 0; b0 < blocks; b0 += RUN) {
        const int n = (int)std::min<int64_t>(RUN, blocks - b0);
        for (int r = 0; r < R; ++r) block_scales<B>(rows + r * row_bytes + b0 * B::BYTES, n, scale[r]);
        for (int i = 0; i < n; ++i) {
            const int64_t b = b0 + i;
            // The rows a few groups ahead, a group's share per block: from DRAM the hardware prefetcher alone
            // left two threads at half the memory's bandwidth (benchmarks/NOTES.md, session 9).
            const uint8_t* ahead = rows + PREFETCH_GROUPS * R * row_bytes + b * R * B::BYTES;
            for (int off = 0; off < R * B::BYTES; off += 64) _mm_prefetch((const char*)(ahead + off), _MM_HINT_T0);
            __m256i xq[TT];
            for (int t = 0; t < TT; ++t) xq[t] = _mm256_loadu_si256((const __m256i*)(x[t].q + 32 * b));
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const uint8_t* blk = rows + r * row_bytes + b * B::BYTES;
                const float dw = scale[r][2 * i], m = K::min(dw, scale[r][2 * i + 1]);
                for (int t = 0; t < TT; ++t) {
                    const __m256 dot = _mm256_cvtepi32_ps(K::dot(blk, xq[t]));
                    acc[r][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * x[t].d[b]), acc[r][t]);
                    mins[r][t] = fmaf(m, x[t].s[b], mins[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) y[t * ldy + r] = sum_lanes8(acc[r][t]) + mins[r][t];
}

template <class B, int TT>
void tile_q8(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const Q8Row* x, float* y, int64_t ldy) {
    constexpr int R = TT == 1 ? 4 : TT == 2 ? 2 : 1;
    const int64_t blocks = cols / 32;
    int i = 0;
    for (; i + R <= nrows; i += R) rows_q8<B, TT, R>(rows + i * row_bytes, row_bytes, blocks, x, y + i, ldy);
    for (; i < nrows; ++i) rows_q8<B, TT, 1>(rows + i * row_bytes, row_bytes, blocks, x, y + i, ldy);
}

using Q8TileFn = void (*)(const uint8_t*, int64_t, int, int64_t, const Q8Row*, float*, int64_t);

// x's rows quantized in this thread's buffer (a chunk of a matmul runs on one thread, start to end).
struct Q8Buffer {
    std::vector<int8_t> q;
    std::vector<float> ds;
    std::vector<Q8Row> rows;

    const Q8Row* quantize(const float* x, int64_t T, int64_t ldx, int64_t cols) {
        const int64_t blocks = cols / 32;
        if ((int64_t)q.size() < T * cols) q.resize(T * cols);
        if ((int64_t)ds.size() < 2 * T * blocks) ds.resize(2 * T * blocks);
        rows.resize(T);
        for (int64_t t = 0; t < T; ++t) {
            int8_t* qt = q.data() + t * cols;
            float *d = ds.data() + 2 * t * blocks, *s = d + blocks;
            quantize_row_q8(x + t * ldx, blocks, qt, d, s);
            rows[t] = Q8Row{qt, d, s};
        }
        return rows.data();
    }
};

inline Q8Buffer& q8_buffer() {
    thread_local Q8Buffer buffer;
    return buffer;
}

#endif  // LC_AVX2
