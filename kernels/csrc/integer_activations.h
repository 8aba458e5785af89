// Integer activations for the 32-element block types on AVX2 (included by quant_matmul.cpp, inside its namespace).
//
// Why: without AVX-512's 16-entry register lookup, expanding a 4-bit code to a float takes a widen, a convert
// and a scale per 8 weights, and the matmul is bound by those instructions, not by memory (benchmarks/NOTES.md,
// session 8: ~8 G weights/s a core). Rounding each 32-element block of x to integers with one float scale lets a
// block's 32 products be summed exactly in integers (vpmaddubsw + vpmaddwd) instead.
//
// Two widths (kernels/quant.py ACTIVATIONS):
// - 16 bits: each block is rounded to 1/32512 of its largest magnitude and every code split into two int8
//   halves, q = 255 * hi + lo with |hi|, |lo| <= 127, so a block takes two vpmaddubsw. The rounding is finer
//   than bfloat16's, and the default model's replies stay those of float32 activations (benchmarks/NOTES.md,
//   session 10), at nearly int8's speed: the matmul is memory-bound again.
// - 8 bits: rounded to 1/127 of the largest magnitude, one vpmaddubsw, as llama.cpp does. It changes answers
//   (the default model's reply to "What is the capital of France?"), so only a user's explicit choice runs it.
// Base 255, not 256: lo then never is -128, which Q8_0's sign trick (below) could not negate, and no pair sum
// of vpmaddubsw (at most 2 * 128 * 127) saturates its int16.
//
// A row of x becomes, for each block b: its codes, scale d (x ~ d * q) and s = d * sum(q). For a weight block
// w = dw * c + m (c its integer codes, m = 0 or its min), the block's product is dw * d * sum(c * q) + m * s:
// exactly the dequantized weights times the dequantized activations.
//
// Each output sums its blocks in the weight's order with one accumulator, whatever T or the tiling, so batched
// rows stay bitwise the rows alone (quant_matmul.cpp's invariant).

#ifdef LC_AVX2

constexpr int WIDE_BASE = 255;
constexpr float WIDE_LIMIT = 127.0f * WIDE_BASE + 127.0f;  // 32512: |hi|, |lo| <= 127

struct IntRow {
    const int8_t* hi;  // blocks * 32: the codes (8 bits), or their high halves (16 bits)
    const int8_t* lo;  // blocks * 32 low halves (16 bits only)
    const float* d;    // blocks scales
    const float* s;    // blocks scaled sums
};

inline float block_amax(const __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

// Four vectors of eight int32 (each within int8) as 32 int8 in element order.
inline void store_bytes(const __m256i i[4], int8_t* out) {
    // packs interleave the two 128-bit lanes; the permute puts the 32 codes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i*)out, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

inline int32_t sum_ints(const __m256i i[4]) {
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
}

// Round-to-nearest-even of x * (LIMIT / max|x|) per block, as numpy's rint does in tests/test_quant_matmul.py;
// 16 bits also split each code q into hi = round(q / 255) (never a tie: 255 is odd) and lo = q - 255 * hi.
template <bool WIDE>
inline void quantize_row(const float* x, int64_t blocks, int8_t* hi, int8_t* lo, float* d, float* s) {
    constexpr float LIMIT = WIDE ? WIDE_LIMIT : 127.0f;
    constexpr int ROUND = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t b = 0; b < blocks; ++b) {
        __m256 v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
        const float mx = block_amax(v);
        const __m256 inv = _mm256_set1_ps(mx > 0.0f ? LIMIT / mx : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], inv), ROUND));
        if constexpr (WIDE) {
            __m256i h[4], l[4];
            for (int k = 0; k < 4; ++k) {
                // q / 255 is at least 1/510 from a half, far beyond the multiply's rounding: the nearest integer.
                h[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[k]), _mm256_set1_ps(1.0f / WIDE_BASE)), ROUND));
                l[k] = _mm256_sub_epi32(q[k], _mm256_sub_epi32(_mm256_slli_epi32(h[k], 8), h[k]));
            }
            store_bytes(h, hi + 32 * b);
            store_bytes(l, lo + 32 * b);
        } else {
            store_bytes(q, hi + 32 * b);
        }
        d[b] = mx / LIMIT;
        s[b] = d[b] * (float)sum_ints(q);
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

// Per type: the block's 32 codes (unsigned bytes < 128, or for Q8_0 signed ones: SIGNED) and the min m of
// dw * c + m, from the block's (d, m) fp16 pair as block_scales converts it.
struct IntQ4_0 {
    static constexpr bool SIGNED = false;
    static inline __m256i codes(const uint8_t* b) { return nibble_codes(b + 2); }
    static inline float min(float d, float) { return -8.0f * d; }
};
struct IntQ4_1 {
    static constexpr bool SIGNED = false;
    static inline __m256i codes(const uint8_t* b) { return nibble_codes(b + 4); }
    static inline float min(float, float m) { return m; }
};
struct IntQ5_0 {
    static constexpr bool SIGNED = false;
    static inline __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibble_codes(b + 6), fifth_bit_bytes(load_u32(b + 2))); }
    static inline float min(float d, float) { return -16.0f * d; }
};
struct IntQ5_1 {
    static constexpr bool SIGNED = false;
    static inline __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibble_codes(b + 8), fifth_bit_bytes(load_u32(b + 4))); }
    static inline float min(float, float m) { return m; }
};
struct IntQ8_0 {
    static constexpr bool SIGNED = true;
    static inline __m256i codes(const uint8_t* b) { return _mm256_loadu_si256((const __m256i*)(b + 2)); }
    static inline float min(float, float) { return 0.0f; }
};

template <class B> struct IntOf { using type = void; };
template <> struct IntOf<TQ4_0> { using type = IntQ4_0; };
template <> struct IntOf<TQ4_1> { using type = IntQ4_1; };
template <> struct IntOf<TQ5_0> { using type = IntQ5_0; };
template <> struct IntOf<TQ5_1> { using type = IntQ5_1; };
template <> struct IntOf<TQ8_0> { using type = IntQ8_0; };

// Eight int32 partial sums of a block's codes times its activation codes, exact. vpmaddubsw takes unsigned
// bytes first: signed codes go in as |c| with the activations' signs flipped where c < 0.
template <bool SIGNED, bool WIDE>
inline __m256i block_dot(__m256i c, __m256i hi, __m256i lo) {
    if constexpr (SIGNED) {
        hi = _mm256_sign_epi8(hi, c);
        if constexpr (WIDE) lo = _mm256_sign_epi8(lo, c);
        c = _mm256_sign_epi8(c, c);
    }
    if constexpr (WIDE)
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(c, hi), _mm256_set1_epi16(WIDE_BASE)),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(c, lo), _mm256_set1_epi16(1)));
    else
        return _mm256_madd_epi16(_mm256_maddubs_epi16(c, hi), _mm256_set1_epi16(1));
}

constexpr int PREFETCH_GROUPS = 4;

// R consecutive weight rows against TT rows of integer x.
template <class B, bool WIDE, int TT, int R>
inline void rows_int(const uint8_t* rows, int64_t row_bytes, int64_t blocks, const IntRow* x, float* y, int64_t ldy) {
    using K = typename IntOf<B>::type;
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
            __m256i xhi[TT], xlo[TT];
            for (int t = 0; t < TT; ++t) {
                xhi[t] = _mm256_loadu_si256((const __m256i*)(x[t].hi + 32 * b));
                xlo[t] = WIDE ? _mm256_loadu_si256((const __m256i*)(x[t].lo + 32 * b)) : xhi[t];
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const __m256i c = K::codes(rows + r * row_bytes + b * B::BYTES);
                const float dw = scale[r][2 * i], m = K::min(dw, scale[r][2 * i + 1]);
                for (int t = 0; t < TT; ++t) {
                    const __m256 dot = _mm256_cvtepi32_ps(block_dot<K::SIGNED, WIDE>(c, xhi[t], xlo[t]));
                    acc[r][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * x[t].d[b]), acc[r][t]);
                    mins[r][t] = fmaf(m, x[t].s[b], mins[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) y[t * ldy + r] = sum_lanes8(acc[r][t]) + mins[r][t];
}

template <class B, bool WIDE, int TT>
void tile_int(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const IntRow* x, float* y, int64_t ldy) {
    constexpr int R = TT == 1 ? 4 : TT == 2 ? 2 : 1;
    const int64_t blocks = cols / 32;
    int i = 0;
    for (; i + R <= nrows; i += R) rows_int<B, WIDE, TT, R>(rows + i * row_bytes, row_bytes, blocks, x, y + i, ldy);
    for (; i < nrows; ++i) rows_int<B, WIDE, TT, 1>(rows + i * row_bytes, row_bytes, blocks, x, y + i, ldy);
}

using IntTileFn = void (*)(const uint8_t*, int64_t, int, int64_t, const IntRow*, float*, int64_t);

// x's rows rounded in this thread's buffer (a chunk of a matmul runs on one thread, start to end).
struct IntBuffer {
    std::vector<int8_t> hi, lo;
    std::vector<float> ds;
    std::vector<IntRow> rows;

    const IntRow* quantize(const float* x, int64_t T, int64_t ldx, int64_t cols, bool wide) {
        const int64_t blocks = cols / 32;
        if ((int64_t)hi.size() < T * cols) hi.resize(T * cols);
        if (wide && (int64_t)lo.size() < T * cols) lo.resize(T * cols);
        if ((int64_t)ds.size() < 2 * T * blocks) ds.resize(2 * T * blocks);
        rows.resize(T);
        for (int64_t t = 0; t < T; ++t) {
            int8_t *h = hi.data() + t * cols, *l = wide ? lo.data() + t * cols : nullptr;
            float *d = ds.data() + 2 * t * blocks, *s = d + blocks;
            if (wide)
                quantize_row<true>(x + t * ldx, blocks, h, l, d, s);
            else
                quantize_row<false>(x + t * ldx, blocks, h, nullptr, d, s);
            rows[t] = IntRow{h, l, d, s};
        }
        return rows.data();
    }
};

inline IntBuffer& int_buffer() {
    thread_local IntBuffer buffer;
    return buffer;
}

#endif  // LC_AVX2
