// Matrix products straight from GGUF's quantized weight blocks, for the CPU: y[T, out] = x[T, in] @ W^T with
// x and y float32 and W in its ggml blocks (rows = output features, each row a run of blocks along `in`).
//
// Why: a decode step is bound by the bytes of weight it streams. Dequantizing the default model's Q4_1 GGUF
// to bfloat16 streams 269 MB a token; reading the 4.5-bit blocks themselves streams ~96 MB. Each block is
// expanded into registers once and used for every row of x (register blocking over T), so small batches
// cost about the same memory traffic as one token.
//
// Each output is summed in an order fixed by the weight's layout alone (two accumulators per (weight row,
// x row), split by position in the block, whatever T, the tiling or the thread count): results are bitwise
// independent of batching, which design.md's invariant 5 (outputs don't depend on batching) relies on.
//
// Layouts are ggml's, as the `gguf` package's gguf/quants.py reads them (that module is the reference in
// tests/test_quant_matmul.py). Three code paths: AVX-512 (F, BW, VL with F16C), AVX2 (with FMA and F16C) and a
// portable C++ one, which is what a build without those extensions gets. Parallel over output rows with OpenMP; the library
// links libgomp.so.1, which resolves to the runtime torch has already loaded, so it shares torch's threads.
//
// Built at first use by kernels/quant.py (through kernels/native_build.py).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define LC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Most desktop CPUs (AMD Zen 1-3, Intel's consumer cores since Alder Lake) have AVX2 but not AVX-512. Without
// this path they got the portable one, whose scalar dot products ran the default model at ~9 tok/s.
#include <immintrin.h>
#define LC_AVX2 1
#endif

namespace {

// gguf.GGMLQuantizationType values.
enum : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

// Rows of x per register tile: 8 rows x 2 accumulators + weights + temporaries fit the 32 zmm registers.
// (16 rows x 1 accumulator spilled and ran 40% slower at T=16; larger T runs in tiles of 8 while the
// weight rows stay in L1.) AVX2 has 16 ymm registers: 4 rows x 2 accumulators.
#ifdef LC_AVX2
constexpr int MAX_TILE = 4;
#else
constexpr int MAX_TILE = 8;
#endif
// Below this much work (in localchat_quant_matmul's cost units, ~bytes streamed) a call runs on the calling
// thread: waking the team costs more than it saves.
constexpr int64_t SERIAL_COST = 16384;
// Chunks per thread of a parallel phase (chunks::share): enough that the last ones balance the threads
// and that a descheduled thread's chunk is short, few enough that each stays a long run of rows.
constexpr int CHUNKS_PER_THREAD = 4;

// ---- a phase's chunks, shared by threads that may be descheduled -----------------------------------------
// On the shared 2-core machines this project runs on, the browser drawing a reply takes one of the cores now
// and then. A thread waiting at a barrier for the descheduled one then spins through the whole time slice, so
// every millisecond another process runs cost the engine more than a millisecond (benchmarks/NOTES.md,
// session 6). Instead a phase is cut into chunks, each with a state (free, claimed, done): a thread runs its
// own chunks in order, then claims the other threads' free ones from their far end, then waits for the
// chunks still claimed, and runs one itself when its owner has held it for much longer than a chunk takes
// (the owner is off the CPU). So a descheduled thread holds the others up by one chunk's time at most.
// Running a chunk twice is harmless because a chunk only stores final values into outputs of its own,
// computed from inputs nothing changes while the call runs; the late copy stores the same bits again.
namespace chunks {

enum : int32_t { FREE = 0, CLAIMED = 1, DONE = 2 };
constexpr int64_t STUCK_MIN_NS = 100000;  // well above a chunk's time and the scheduler's small jitters
int64_t stuck_override = -1;              // tests: 0 runs every chunk still claimed again (localchat_chunks_debug)
int64_t reruns = 0;                       // chunks run a second time, since the library was loaded

inline int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

inline int32_t load(const int32_t* st) { return __atomic_load_n(st, __ATOMIC_ACQUIRE); }

// Claims chunk c if it is free and runs it; returns how long it took (0: not claimed).
template <class Run>
inline int64_t claim_and_run(int32_t* st, int c, Run& run) {
    int32_t expected = FREE;
    if (__atomic_load_n(st + c, __ATOMIC_RELAXED) != FREE ||
        !__atomic_compare_exchange_n(st + c, &expected, CLAIMED, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    const int64_t t0 = now_ns();
    run(c);
    __atomic_store_n(st + c, DONE, __ATOMIC_RELEASE);
    return now_ns() - t0 + 1;
}

// Runs chunks [0, n) of a phase on nt threads (this is thread tid); returns once every chunk is done, so it
// is also the phase's barrier. `st` holds n states, all FREE before the phase.
template <class Run>
void share(int32_t* st, int n, int tid, int nt, Run&& run) {
    int64_t longest = 0;
    for (int c = n * tid / nt, end = n * (tid + 1) / nt; c < end; ++c) longest = std::max(longest, claim_and_run(st, c, run));
    for (int k = 1; k < nt; ++k) {
        const int other = (tid + k) % nt;
        for (int c = n * (other + 1) / nt - 1, first = n * other / nt; c >= first; --c)
            longest = std::max(longest, claim_and_run(st, c, run));
    }
    const int64_t forced = __atomic_load_n(&stuck_override, __ATOMIC_RELAXED);
    const int64_t stuck = forced >= 0 ? forced : std::max(STUCK_MIN_NS, 4 * longest);
    for (int c = 0; c < n; ++c) {
        if (load(st + c) == DONE) continue;
        const int64_t since = now_ns();
        for (int spins = 1; load(st + c) != DONE; ++spins) {
            relax();
            if ((forced == 0 || spins % 64 == 0) && now_ns() - since >= stuck) {
                __atomic_fetch_add(&reruns, 1, __ATOMIC_RELAXED);
                run(c);
                __atomic_store_n(st + c, DONE, __ATOMIC_RELEASE);
                break;
            }
        }
    }
}

// States for `phases` phases of up to `per_phase` chunks each, all FREE; one cache line apart per phase.
struct Board {
    int32_t* states = nullptr;
    int64_t stride = 0, capacity = 0;

    void reset(int64_t phases, int64_t per_phase) {
        stride = (per_phase + 15) / 16 * 16;
        if (phases * stride > capacity) {
            free(states);
            capacity = phases * stride;
            states = (int32_t*)aligned_alloc(64, (size_t)capacity * sizeof(int32_t));
        }
        memset(states, 0, (size_t)(phases * stride) * sizeof(int32_t));
    }
    int32_t* phase(int64_t i) const { return states + i * stride; }
};

// One per calling thread: engines in different threads may run steps at the same time.
inline Board& board() {
    static thread_local Board b;
    return b;
}

}  // namespace chunks

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

inline float fp16_to_float(uint16_t h) {  // exact for every half, subnormals, infinities and NaNs included
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else {
        const float f = (float)mant * 5.9604644775390625e-8f;  // mant * 2^-24, exact
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline float load_fp16(const uint8_t* p) {
#if defined(LC_AVX512) || defined(LC_AVX2)
    return _cvtsh_ss(load_u16(p));
#else
    return fp16_to_float(load_u16(p));
#endif
}

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaNs kept quiet: what torch's .to(bfloat16) does
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// The 6-bit sub-block scales and mins of Q4_K/Q5_K, packed 8 + 8 into 12 bytes (gguf/quants.py Q4_K.get_scale_min).
inline void k_scale_min(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0x0f) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Block types. Each has QK (elements per block), BYTES, DENSE (a plain float row, any length), `decode`
// (portable: one block to QK floats) and, with AVX-512, `avx(block, offset, sink, ...)`, which hands every
// 16-element run of the block to `sink(element offset, __m512 values, k)` in registers, k being the run's
// place in its block. The 32-element types' `avx` also takes the block's scale and min as floats.
// ---------------------------------------------------------------------------------------------------------

#ifdef LC_AVX512
inline __m512 iota16() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }

// 4-bit codes become floats by a 16-entry lookup (vpermps reads only the low 4 bits of each index) into a
// per-block table of d*q + m: one FMA per block builds the table, instead of a convert and an FMA per
// 16 weights. At T=1 this path is as much compute- as bandwidth-bound, and of the variants measured
// (convert + FMA, the d*dot(x,q) + m*sum(x) identity, broadcast + variable shifts) the lookup took the
// fewest cycles a block (5.5 against 7.5-8.6 for Q4_1, one core, L1-resident).
inline __m512 lookup16(__m512i idx, __m512 table) { return _mm512_permutexvar_ps(idx, table); }
#endif

#ifdef LC_AVX2
// AVX2 has no 16-entry register lookup: codes are widened to int32 lanes, converted and scaled (one FMA a run).
inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }  // the low 8 bytes
inline __m256 u8x8(const uint8_t* p) { return u8x8(_mm_loadl_epi64((const __m128i*)p)); }
inline __m128i low_nibbles(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(15)); }
inline __m128i high_nibbles(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)); }
// Lane i is 16 when bit i of `bits` is set (the fifth bit of Q5 codes).
inline __m256i fifth_bits(uint32_t bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), sel), sel), _mm256_set1_epi32(16));
}
// The four runs of 8 of a 32-element block of 4-bit codes (low nibbles first), as d*q + m.
template <class S>
inline void q4_avx2(const uint8_t* qs, int64_t off, S& sink, float d, float m) {
    const __m128i v = _mm_loadu_si128((const __m128i*)qs), lo = low_nibbles(v), hi = high_nibbles(v);
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    sink(off, _mm256_fmadd_ps(u8x8(lo), vd, vm), 0);
    sink(off + 8, _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), vd, vm), 1);
    sink(off + 16, _mm256_fmadd_ps(u8x8(hi), vd, vm), 2);
    sink(off + 24, _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), vd, vm), 3);
}
// The same for 5-bit codes, the fifth bit of element j being bit j of the 32-bit word at qh_bytes.
template <class S>
inline void q5_avx2(const uint8_t* qh_bytes, const uint8_t* qs, int64_t off, S& sink, float d, float m) {
    const uint32_t qh = load_u32(qh_bytes);
    const __m128i v = _mm_loadu_si128((const __m128i*)qs), lo = low_nibbles(v), hi = high_nibbles(v);
    const __m128i runs[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
        const __m256i q = _mm256_or_si256(_mm256_cvtepu8_epi32(runs[r]), fifth_bits((qh >> (8 * r)) & 0xff));
        sink(off + 8 * r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), vd, vm), r);
    }
}
#endif

// The 32-element types keep their fp16 scale (and min) in the block's first 4 bytes. The AVX-512 walk converts
// a run of blocks' scales to float32 before expanding the blocks (walk_blocks32), so `avx` gets them as
// plain floats: converting and broadcasting them block by block cost shuffle-unit work that, at T=1, competed
// with the nibble lookups (Q4_1, one core, L2-resident: 2.6 -> 1.7-1.9 ns a block).
struct TQ4_0 {
    static constexpr int QK = 32, BYTES = 18;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b);
        for (int j = 0; j < 16; ++j) {
            out[j] = d * (float)((b[2 + j] & 15) - 8);
            out[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink, float d, float) {
        const __m512 table = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_sub_ps(iota16(), _mm512_set1_ps(8)));
        const __m512i v = bytes16(b + 2);
        sink(off, lookup16(v, table), 0);
        sink(off + 16, lookup16(_mm512_srli_epi32(v, 4), table), 1);
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink, float d, float) { q4_avx2(b + 2, off, sink, d, -8.0f * d); }
#endif
};

struct TQ4_1 {
    static constexpr int QK = 32, BYTES = 20;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b), m = load_fp16(b + 2);
        for (int j = 0; j < 16; ++j) {
            out[j] = d * (float)(b[4 + j] & 15) + m;
            out[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink, float d, float m) {
        const __m512 table = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(d), _mm512_set1_ps(m));
        const __m512i v = bytes16(b + 4);
        sink(off, lookup16(v, table), 0);
        sink(off + 16, lookup16(_mm512_srli_epi32(v, 4), table), 1);
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink, float d, float m) { q4_avx2(b + 4, off, sink, d, m); }
#endif
};

// Q5_0/Q5_1: the fifth bit of element j is bit j of a 32-bit word; 5-bit codes index a 32-entry table held
// in two registers (vpermt2ps reads the low 5 bits of each index).
#ifdef LC_AVX512
template <class S>
inline void q5_avx(const uint8_t* qh_bytes, const uint8_t* qs, __m512 lo_table, __m512 hi_table, int64_t off, S& sink) {
    const uint32_t qh = load_u32(qh_bytes);
    const __m512i v = bytes16(qs), sixteen = _mm512_set1_epi32(16);
    const __m512i low = _mm512_and_si512(v, _mm512_set1_epi32(15)), high = _mm512_srli_epi32(v, 4);
    const __m512i i0 = _mm512_mask_or_epi32(low, (__mmask16)(qh & 0xffff), low, sixteen);
    const __m512i i1 = _mm512_mask_or_epi32(high, (__mmask16)(qh >> 16), high, sixteen);
    sink(off, _mm512_permutex2var_ps(lo_table, i0, hi_table), 0);
    sink(off + 16, _mm512_permutex2var_ps(lo_table, i1, hi_table), 1);
}
#endif

struct TQ5_0 {
    static constexpr int QK = 32, BYTES = 22;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b);
        const uint32_t qh = load_u32(b + 2);
        for (int j = 0; j < 16; ++j) {
            const int lo = (b[6 + j] & 15) | (((qh >> j) & 1) << 4);
            const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            out[j] = d * (float)(lo - 16);
            out[j + 16] = d * (float)(hi - 16);
        }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink, float d, float) {
        const __m512 vd = _mm512_set1_ps(d);
        const __m512 lo = _mm512_mul_ps(vd, _mm512_sub_ps(iota16(), _mm512_set1_ps(16)));
        q5_avx(b + 2, b + 6, lo, _mm512_mul_ps(vd, iota16()), off, sink);
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink, float d, float) { q5_avx2(b + 2, b + 6, off, sink, d, -16.0f * d); }
#endif
};

struct TQ5_1 {
    static constexpr int QK = 32, BYTES = 24;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b), m = load_fp16(b + 2);
        const uint32_t qh = load_u32(b + 4);
        for (int j = 0; j < 16; ++j) {
            const int lo = (b[8 + j] & 15) | (((qh >> j) & 1) << 4);
            const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            out[j] = d * (float)lo + m;
            out[j + 16] = d * (float)hi + m;
        }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink, float d, float m) {
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        const __m512 lo = _mm512_fmadd_ps(iota16(), vd, vm);
        const __m512 hi = _mm512_fmadd_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16)), vd, vm);
        q5_avx(b + 4, b + 8, lo, hi, off, sink);
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink, float d, float m) { q5_avx2(b + 4, b + 8, off, sink, d, m); }
#endif
};

struct TQ8_0 {
    static constexpr int QK = 32, BYTES = 34;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b);
        for (int j = 0; j < 32; ++j) out[j] = d * (float)(int8_t)b[2 + j];
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink, float d, float) {
        const __m512 vd = _mm512_set1_ps(d);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2 + 16 * h)));
            sink(off + 16 * h, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(q)), h);
        }
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink, float d, float) {
        const __m256 vd = _mm256_set1_ps(d);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(b + 2 + 8 * r)));
            sink(off + 8 * r, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(q)), r);
        }
    }
#endif
};

// Q4_K/Q5_K: 256-element super-blocks of 8 sub-blocks of 32, each with a 6-bit scale and min:
// w = d*sc*q - dmin*mn. Bytes 32g..32g+31 of qs hold sub-block 2g in their low nibbles and 2g+1 in their high.
struct TQ4_K {
    static constexpr int QK = 256, BYTES = 144;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b), dmin = load_fp16(b + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(b + 4, sc, mn);
        const uint8_t* qs = b + 16;
        for (int g = 0; g < 4; ++g) {
            const float d0 = d * sc[2 * g], m0 = dmin * mn[2 * g], d1 = d * sc[2 * g + 1], m1 = dmin * mn[2 * g + 1];
            for (int i = 0; i < 32; ++i) {
                out[64 * g + i] = d0 * (float)(qs[32 * g + i] & 15) - m0;
                out[64 * g + 32 + i] = d1 * (float)(qs[32 * g + i] >> 4) - m1;
            }
        }
    }
#if defined(LC_AVX512) || defined(LC_AVX2)
    // The 8 scales and mins as floats in one pass; each sub-block then broadcasts its pair.
    static inline void scales(const uint8_t* b, float* ds, float* ms) {
        uint8_t sc[8], mn[8];
        k_scale_min(b + 4, sc, mn);
        const __m256 d = _mm256_set1_ps(load_fp16(b)), dmin = _mm256_set1_ps(load_fp16(b + 2));
        _mm256_storeu_ps(ds, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)sc)))));
        _mm256_storeu_ps(ms, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)mn)))));
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink) {
        float ds[8], ms[8];
        scales(b, ds, ms);
        const uint8_t* qs = b + 16;
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
            const __m128i v0 = _mm_loadu_si128((const __m128i*)(qs + 32 * g)), v1 = _mm_loadu_si128((const __m128i*)(qs + 32 * g + 16));
            const __m128i runs[8] = {low_nibbles(v0), _mm_srli_si128(low_nibbles(v0), 8), low_nibbles(v1), _mm_srli_si128(low_nibbles(v1), 8),
                                     high_nibbles(v0), _mm_srli_si128(high_nibbles(v0), 8), high_nibbles(v1), _mm_srli_si128(high_nibbles(v1), 8)};
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
                const int s = 2 * g + r / 4;
                sink(off + 64 * g + 8 * r, _mm256_fmsub_ps(u8x8(runs[r]), _mm256_set1_ps(ds[s]), _mm256_set1_ps(ms[s])), r);
            }
        }
    }
#endif
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink) {
        float ds[8], ms[8];
        scales(b, ds, ms);
        const uint8_t* qs = b + 16;
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
            const __m512 t0 = _mm512_fmsub_ps(iota16(), _mm512_set1_ps(ds[2 * g]), _mm512_set1_ps(ms[2 * g]));
            const __m512 t1 = _mm512_fmsub_ps(iota16(), _mm512_set1_ps(ds[2 * g + 1]), _mm512_set1_ps(ms[2 * g + 1]));
            const __m512i v0 = bytes16(qs + 32 * g), v1 = bytes16(qs + 32 * g + 16);
            sink(off + 64 * g, lookup16(v0, t0), 0);
            sink(off + 64 * g + 16, lookup16(v1, t0), 1);
            sink(off + 64 * g + 32, lookup16(_mm512_srli_epi32(v0, 4), t1), 2);
            sink(off + 64 * g + 48, lookup16(_mm512_srli_epi32(v1, 4), t1), 3);
        }
    }
#endif
};

// Q5_K: as Q4_K plus a fifth bit: bit s of qh[i] belongs to element i of sub-block s.
struct TQ5_K {
    static constexpr int QK = 256, BYTES = 176;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const float d = load_fp16(b), dmin = load_fp16(b + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *qs = b + 48;
        for (int s = 0; s < 8; ++s) {
            const float ds = d * sc[s], ms = dmin * mn[s];
            for (int i = 0; i < 32; ++i) {
                const int low = (s & 1) ? (qs[32 * (s / 2) + i] >> 4) : (qs[32 * (s / 2) + i] & 15);
                out[32 * s + i] = ds * (float)(low | (((qh[i] >> s) & 1) << 4)) - ms;
            }
        }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink) {
        float ds[8], ms[8];
        TQ4_K::scales(b, ds, ms);
        const uint8_t *qh = b + 16, *qs = b + 48;
        const __m512i h0 = bytes16(qh), h1 = bytes16(qh + 16), nibble = _mm512_set1_epi32(15);
        const __m512i sixteen = _mm512_set1_epi32(16);
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            const __m512 lo = _mm512_fmsub_ps(iota16(), _mm512_set1_ps(ds[s]), _mm512_set1_ps(ms[s]));
            const __m512 hi = _mm512_fmsub_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16)), _mm512_set1_ps(ds[s]), _mm512_set1_ps(ms[s]));
            const int shift = 4 * (s & 1);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const __m512i v = _mm512_and_si512(_mm512_srli_epi32(bytes16(qs + 32 * (s / 2) + 16 * h), shift), nibble);
                // bit s of each qh byte moved to bit 4: the 32-entry lookup then picks lo or hi table
                const __m512i bit = _mm512_and_si512(_mm512_slli_epi32(_mm512_srli_epi32(h ? h1 : h0, s), 4), sixteen);
                sink(off + 32 * s + 16 * h, _mm512_permutex2var_ps(lo, _mm512_or_si512(v, bit), hi), 2 * s + h);
            }
        }
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink) {
        float ds[8], ms[8];
        TQ4_K::scales(b, ds, ms);
        const uint8_t *qh = b + 16, *qs = b + 48;
        const __m256i nibble = _mm256_set1_epi32(15), sixteen = _mm256_set1_epi32(16);
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            const __m256 vd = _mm256_set1_ps(ds[s]), vm = _mm256_set1_ps(ms[s]);
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
                const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + 32 * (s / 2) + 8 * r)));
                const __m256i low = _mm256_and_si256(_mm256_srli_epi32(codes, 4 * (s & 1)), nibble);
                const __m256i high = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qh + 8 * r)));
                const __m256i bit = _mm256_and_si256(_mm256_slli_epi32(_mm256_srli_epi32(high, s), 4), sixteen);
                sink(off + 32 * s + 8 * r, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_or_si256(low, bit)), vd, vm), r);
            }
        }
    }
#endif
};

// Q6_K: 16 sub-blocks of 16 with int8 scales; w = d*sc*(q - 32), q 6-bit. Element e = 128h + r takes its low
// nibble from ql[64h + r%64] (high nibble when r >= 64) and its top two bits from qh[32h + r%32] >> 2*(r/32).
struct TQ6_K {
    static constexpr int QK = 256, BYTES = 210;
    static constexpr bool DENSE = false;
    static void decode(const uint8_t* b, float* out) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t* sc = (const int8_t*)(b + 192);
        const float d = load_fp16(b + 208);
        for (int h = 0; h < 2; ++h)
            for (int r = 0; r < 128; ++r) {
                const int low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
                const int high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                const int e = 128 * h + r;
                out[e] = d * (float)sc[e / 16] * (float)((low | (high << 4)) - 32);
            }
    }
#ifdef LC_AVX512
    template <class S>
    static inline void avx(const uint8_t* b, int64_t off, S& sink) {
        const uint8_t *ql = b, *qh = b + 128;
        alignas(64) float ds[16];
        const __m512 d = _mm512_set1_ps(load_fp16(b + 208));
        _mm512_store_ps(ds, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))))));
        const __m512i nibble = _mm512_set1_epi32(15), top = _mm512_set1_epi32(0x30), bias = _mm512_set1_epi32(32);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
            for (int r0 = 0; r0 < 32; r0 += 16) {  // r = r0 + 32k, k = 0..3, share one qh load
                const __m512i vh = bytes16(qh + 32 * h + r0);
                const __m512i vl0 = bytes16(ql + 64 * h + r0), vl1 = bytes16(ql + 64 * h + r0 + 32);
#pragma GCC unroll 4
                for (int k = 0; k < 4; ++k) {
                    const __m512i vl = (k & 1) ? vl1 : vl0;
                    const __m512i low = k < 2 ? _mm512_and_si512(vl, nibble) : _mm512_srli_epi32(vl, 4);
                    const __m512i high = _mm512_and_si512(k < 2 ? _mm512_slli_epi32(vh, 4 - 2 * k) : _mm512_srli_epi32(vh, 2 * k - 4), top);
                    const int e = 128 * h + r0 + 32 * k;
                    const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(low, high), bias));
                    sink(off + e, _mm512_mul_ps(_mm512_set1_ps(ds[e / 16]), q), k);
                }
            }
    }
#endif
#ifdef LC_AVX2
    template <class S>
    static inline void avx2(const uint8_t* b, int64_t off, S& sink) {
        const uint8_t *ql = b, *qh = b + 128;
        alignas(32) float ds[16];
        const __m256 d = _mm256_set1_ps(load_fp16(b + 208));
        const __m128i sc = _mm_loadu_si128((const __m128i*)(b + 192));
        _mm256_store_ps(ds, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
        _mm256_store_ps(ds + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
        const __m256i nibble = _mm256_set1_epi32(15), three = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 16
            for (int r = 0; r < 128; r += 8) {
                const __m256i l = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(ql + 64 * h + r % 64)));
                const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qh + 32 * h + r % 32)));
                const __m256i low = _mm256_and_si256(_mm256_srli_epi32(l, 4 * (r / 64)), nibble);
                const __m256i high = _mm256_and_si256(_mm256_srli_epi32(t, 2 * (r / 32)), three);
                const __m256i q = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), bias);
                const int e = 128 * h + r;
                sink(off + e, _mm256_mul_ps(_mm256_set1_ps(ds[e / 16]), _mm256_cvtepi32_ps(q)), r / 8);
            }
    }
#endif
};

// Plain float rows (F32/F16/BF16): any length; the AVX-512 path takes 16 at a time plus a masked tail.
struct TF32 {
    static constexpr int QK = 1, BYTES = 4;
    static constexpr bool DENSE = true;
    static void decode_n(const uint8_t* p, int n, float* out) { memcpy(out, p, (size_t)n * 4); }
#ifdef LC_AVX512
    static inline __m512 load16(const uint8_t* p) { return _mm512_loadu_ps(p); }
    static inline __m512 load_tail(const uint8_t* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
#endif
#ifdef LC_AVX2
    static inline __m256 load8(const uint8_t* p) { return _mm256_loadu_ps((const float*)p); }
    static inline __m256 load_tail(const uint8_t* p, int n) {  // n < 8 values, the rest zero
        alignas(32) uint8_t buf[32] = {};
        memcpy(buf, p, (size_t)n * BYTES);
        return load8(buf);
    }
#endif
};

struct TF16 {
    static constexpr int QK = 1, BYTES = 2;
    static constexpr bool DENSE = true;
    static void decode_n(const uint8_t* p, int n, float* out) {
        for (int i = 0; i < n; ++i) out[i] = load_fp16(p + 2 * i);
    }
#ifdef LC_AVX512
    static inline __m512 load16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static inline __m512 load_tail(const uint8_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
#endif
#ifdef LC_AVX2
    static inline __m256 load8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static inline __m256 load_tail(const uint8_t* p, int n) {  // n < 8 values, the rest zero
        alignas(32) uint8_t buf[32] = {};
        memcpy(buf, p, (size_t)n * BYTES);
        return load8(buf);
    }
#endif
};

struct TBF16 {
    static constexpr int QK = 1, BYTES = 2;
    static constexpr bool DENSE = true;
    static void decode_n(const uint8_t* p, int n, float* out) {
        for (int i = 0; i < n; ++i) out[i] = bf16_to_float(load_u16(p + 2 * i));
    }
#ifdef LC_AVX512
    static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static inline __m512 load16(const uint8_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
    static inline __m512 load_tail(const uint8_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
#endif
#ifdef LC_AVX2
    static inline __m256 load8(const uint8_t* p) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16)); }
    static inline __m256 load_tail(const uint8_t* p, int n) {  // n < 8 values, the rest zero
        alignas(32) uint8_t buf[32] = {};
        memcpy(buf, p, (size_t)n * BYTES);
        return load8(buf);
    }
#endif
};

// ---------------------------------------------------------------------------------------------------------
// Walking a row: every 16-element run of values, in registers (AVX-512) or through a small float buffer.
// ---------------------------------------------------------------------------------------------------------

#if defined(LC_AVX512) || defined(LC_AVX2)
// The (d, m) float pairs of n consecutive 32-element blocks: each block's first 4 bytes, two fp16 (a type
// without a min converts 2 bytes it then ignores).
template <class B>
inline void block_scales(const uint8_t* first, int n, float* scale) {
    for (int i = 0; i < n; ++i)
        _mm_storel_pi((__m64*)(scale + 2 * i), _mm_cvtph_ps(_mm_cvtsi32_si128((int)load_u32(first + i * B::BYTES))));
}
#endif

#ifdef LC_AVX512
// 32-element blocks, a run of up to 64 at a time: first every block's fp16 scale and min (the block's first 4
// bytes; a type without a min converts 2 bytes it then ignores) become a float pair, then the blocks are
// expanded. One load, convert and store per block here replaces a convert and two broadcasts in the
// expansion, where they competed with the lookups.
template <class B, class S>
inline void walk_blocks32(const uint8_t* row, int64_t blocks, S& full) {
    constexpr int RUN = 64;
    alignas(64) float scale[2 * RUN];  // (d, m) pairs
    for (int64_t b0 = 0; b0 < blocks; b0 += RUN) {
        const int n = (int)std::min<int64_t>(RUN, blocks - b0);
        const uint8_t* first = row + b0 * B::BYTES;
        block_scales<B>(first, n, scale);
        for (int i = 0; i < n; ++i) B::avx(first + i * B::BYTES, (b0 + i) * 32, full, scale[2 * i], scale[2 * i + 1]);
    }
}

// full(offset, values, chain) for each run of 16, tail(offset, values, mask) for a dense row's last partial
// run (kept apart so the common case has no masks and its loads fold into the FMAs). `chain` is a constant
// after inlining, set by the run's position in its block (0..3), never by T: the sinks spread each sum over
// two accumulators by it, because one accumulator per row of x would serialize on the FMA latency (4 cycles
// here) when T is small.
template <class B, class S, class U>
inline void walk_row_avx(const uint8_t* row, int64_t cols, S& full, U& tail) {
    if constexpr (B::DENSE) {
        int64_t c = 0;
        for (; c + 64 <= cols; c += 64) {
            full(c, B::load16(row + c * B::BYTES), 0);
            full(c + 16, B::load16(row + (c + 16) * B::BYTES), 1);
            full(c + 32, B::load16(row + (c + 32) * B::BYTES), 2);
            full(c + 48, B::load16(row + (c + 48) * B::BYTES), 3);
        }
        for (; c + 16 <= cols; c += 16) full(c, B::load16(row + c * B::BYTES), 0);
        if (c < cols) {
            const __mmask16 m = (__mmask16)((1u << (cols - c)) - 1);
            tail(c, B::load_tail(row + c * B::BYTES, m), m);
        }
    } else if constexpr (B::QK == 32) {
        walk_blocks32<B>(row, cols / 32, full);
    } else {
        const int64_t blocks = cols / B::QK;
        for (int64_t i = 0; i < blocks; ++i) B::avx(row + i * B::BYTES, i * B::QK, full);
    }
}

// Sixteen accumulators -> one vector whose lane i is the sum of a[i]'s lanes: a transpose-and-add tree,
// ~3 ops a row instead of a full horizontal reduction each (as in kernels/csrc/paged_decode.cpp).
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

// Up to 16 consecutive weight rows against TT rows of x. Each weight run is expanded once and multiplied
// into TT accumulators; the per-row accumulators are parked and reduced 16 rows at a time, which also
// makes the stores to y contiguous.
template <class B, int TT>
void tile_avx(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const float* x, int64_t ldx,
              float* y, int64_t ldy) {
    constexpr int K = 2;  // accumulators per row of x; fixed, so the summation order doesn't depend on T
    __m512 parked[TT][16];
    for (int i = 0; i < 16; ++i) {
        __m512 acc[TT][K];
        for (int t = 0; t < TT; ++t)
            for (int k = 0; k < K; ++k) acc[t][k] = _mm512_setzero_ps();
        if (i < nrows) {
            auto full = [&](int64_t off, __m512 w, int chain) {
#pragma GCC unroll 16
                for (int t = 0; t < TT; ++t)
                    acc[t][chain % K] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + off), acc[t][chain % K]);
            };
            auto tail = [&](int64_t off, __m512 w, __mmask16 m) {
                for (int t = 0; t < TT; ++t) acc[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * ldx + off), acc[t][0]);
            };
            walk_row_avx<B>(rows + i * row_bytes, cols, full, tail);
        }
        for (int t = 0; t < TT; ++t) {
            __m512 sum = acc[t][0];
            for (int k = 1; k < K; ++k) sum = _mm512_add_ps(sum, acc[t][k]);
            parked[t][i] = sum;
        }
    }
    const __mmask16 mask = (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(y + t * ldy, mask, sum_lanes16(parked[t]));
}
#endif

#ifdef LC_AVX2
// As walk_blocks32 above, with AVX2's runs of 8.
template <class B, class S>
inline void walk_blocks32_avx2(const uint8_t* row, int64_t blocks, S& full) {
    constexpr int RUN = 64;
    alignas(32) float scale[2 * RUN];  // (d, m) pairs
    for (int64_t b0 = 0; b0 < blocks; b0 += RUN) {
        const int n = (int)std::min<int64_t>(RUN, blocks - b0);
        const uint8_t* first = row + b0 * B::BYTES;
        block_scales<B>(first, n, scale);
        for (int i = 0; i < n; ++i) B::avx2(first + i * B::BYTES, (b0 + i) * 32, full, scale[2 * i], scale[2 * i + 1]);
    }
}

// full(offset, values, chain) for each run of 8, tail(offset, values, n) for a dense row's last n < 8 values;
// `chain` as in walk_row_avx.
template <class B, class S, class U>
inline void walk_row_avx2(const uint8_t* row, int64_t cols, S& full, U& tail) {
    if constexpr (B::DENSE) {
        int64_t c = 0;
        for (; c + 32 <= cols; c += 32) {
            full(c, B::load8(row + c * B::BYTES), 0);
            full(c + 8, B::load8(row + (c + 8) * B::BYTES), 1);
            full(c + 16, B::load8(row + (c + 16) * B::BYTES), 2);
            full(c + 24, B::load8(row + (c + 24) * B::BYTES), 3);
        }
        for (; c + 8 <= cols; c += 8) full(c, B::load8(row + c * B::BYTES), 0);
        if (c < cols) tail(c, B::load_tail(row + c * B::BYTES, (int)(cols - c)), (int)(cols - c));
    } else if constexpr (B::QK == 32) {
        walk_blocks32_avx2<B>(row, cols / 32, full);
    } else {
        const int64_t blocks = cols / B::QK;
        for (int64_t i = 0; i < blocks; ++i) B::avx2(row + i * B::BYTES, i * B::QK, full);
    }
}

inline __m256i lanes_below(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

inline float sum_lanes8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One weight row's accumulators against TT rows of x: two per row of x, picked by the run's place in its block
// (as tile_avx: never by T, so the summation order is the layout's alone).
template <int TT>
struct RowAcc {
    __m256 a[TT][2];
    const float* x;
    int64_t ldx;

    inline void start(const float* x_, int64_t ldx_) {
        x = x_, ldx = ldx_;
        for (int t = 0; t < TT; ++t) a[t][0] = a[t][1] = _mm256_setzero_ps();
    }
    inline void operator()(int64_t off, __m256 w, int chain) {
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) a[t][chain & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + off), a[t][chain & 1]);
    }
    inline void tail(int64_t off, __m256 w, int n) {
        const __m256i m = lanes_below(n);
        for (int t = 0; t < TT; ++t) a[t][0] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + t * ldx + off, m), a[t][0]);
    }
    inline float sum(int t) const { return sum_lanes8(_mm256_add_ps(a[t][0], a[t][1])); }
};

// R consecutive weight rows against TT rows of x, their blocks walked in lockstep. With one row, each
// accumulator's FMAs form a chain that waits on the FMA's latency every block (T=1 ran at a third of the
// core's FMA rate); R rows' chains are independent, and each row still sums in its own fixed order.
template <class B, int TT, int R>
inline void rows_avx2(const uint8_t* rows, int64_t row_bytes, int64_t cols, const float* x, int64_t ldx, float* y,
                      int64_t ldy) {
    RowAcc<TT> acc[R];
    for (int r = 0; r < R; ++r) acc[r].start(x, ldx);
    if constexpr (B::DENSE) {
        static_assert(R == 1, "float rows are walked one at a time");
        auto tail = [&](int64_t off, __m256 w, int n) { acc[0].tail(off, w, n); };
        walk_row_avx2<B>(rows, cols, acc[0], tail);
    } else if constexpr (B::QK == 32) {
        constexpr int RUN = 64;
        alignas(32) float scale[R][2 * RUN];  // each row's (d, m) pairs, as walk_blocks32
        const int64_t blocks = cols / 32;
        for (int64_t b0 = 0; b0 < blocks; b0 += RUN) {
            const int n = (int)std::min<int64_t>(RUN, blocks - b0);
            for (int r = 0; r < R; ++r) {
                const uint8_t* first = rows + r * row_bytes + b0 * B::BYTES;
                block_scales<B>(first, n, scale[r]);
            }
            for (int i = 0; i < n; ++i)
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r)
                    B::avx2(rows + r * row_bytes + (b0 + i) * B::BYTES, (b0 + i) * 32, acc[r], scale[r][2 * i], scale[r][2 * i + 1]);
        }
    } else {
        for (int64_t i = 0; i < cols / B::QK; ++i)
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) B::avx2(rows + r * row_bytes + i * B::BYTES, i * B::QK, acc[r]);
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) y[t * ldy + r] = acc[r].sum(t);
}

template <class B, int TT>
void tile_avx2(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const float* x, int64_t ldx,
               float* y, int64_t ldy) {
    constexpr int R = B::DENSE ? 1 : TT == 1 ? 4 : TT == 2 ? 2 : 1;  // R * TT * 2 accumulators of 16 registers
    int i = 0;
    for (; i + R <= nrows; i += R) rows_avx2<B, TT, R>(rows + i * row_bytes, row_bytes, cols, x, ldx, y + i, ldy);
    for (; i < nrows; ++i) rows_avx2<B, TT, 1>(rows + i * row_bytes, row_bytes, cols, x, ldx, y + i, ldy);
}
#endif

// Portable: each block is decoded into a float buffer once and dotted with every row of x.
template <class B, class F>
inline void walk_row_portable(const uint8_t* row, int64_t cols, float* buf, int chunk, F&& use) {
    if constexpr (B::DENSE) {
        for (int64_t c = 0; c < cols; c += chunk) {
            const int n = (int)std::min<int64_t>(chunk, cols - c);
            B::decode_n(row + c * B::BYTES, n, buf);
            use(c, n);
        }
    } else {
        for (int64_t i = 0; i < cols / B::QK; ++i) {
            B::decode(row + i * B::BYTES, buf);
            use(i * B::QK, B::QK);
        }
    }
}

template <class B, int TT>
void tile_portable(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const float* x, int64_t ldx,
                   float* y, int64_t ldy) {
    float buf[256];
    for (int i = 0; i < nrows; ++i) {
        float acc[TT] = {};
        walk_row_portable<B>(rows + i * row_bytes, cols, buf, 256, [&](int64_t off, int n) {
            for (int t = 0; t < TT; ++t) {
                const float* xt = x + t * ldx + off;
                float s = 0.0f;
                for (int k = 0; k < n; ++k) s += buf[k] * xt[k];
                acc[t] += s;
            }
        });
        for (int t = 0; t < TT; ++t) y[t * ldy + i] = acc[t];
    }
}

template <class B, int TT>
void tile(const uint8_t* rows, int64_t row_bytes, int nrows, int64_t cols, const float* x, int64_t ldx, float* y,
          int64_t ldy) {
#if defined(LC_AVX512)
    tile_avx<B, TT>(rows, row_bytes, nrows, cols, x, ldx, y, ldy);
#elif defined(LC_AVX2)
    tile_avx2<B, TT>(rows, row_bytes, nrows, cols, x, ldx, y, ldy);
#else
    tile_portable<B, TT>(rows, row_bytes, nrows, cols, x, ldx, y, ldy);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization of whole rows (for prompt chunks, where a dense GEMM on the expanded weight wins).
// ---------------------------------------------------------------------------------------------------------

#ifdef LC_AVX512
inline __m256i float_to_bf16_avx(__m512 v) {  // float_to_bf16 on 16 lanes
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#endif

#ifdef LC_AVX2
inline __m128i float_to_bf16_avx2(__m256 v) {  // float_to_bf16 on 8 lanes
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

template <class B>
void dequant_row(const uint8_t* row, int64_t cols, void* out, int bf16) {
#ifdef LC_AVX512
    if (bf16) {
        uint16_t* o = (uint16_t*)out;
        auto full = [&](int64_t off, __m512 w, int) { _mm256_storeu_si256((__m256i*)(o + off), float_to_bf16_avx(w)); };
        auto tail = [&](int64_t off, __m512 w, __mmask16 m) { _mm256_mask_storeu_epi16(o + off, m, float_to_bf16_avx(w)); };
        walk_row_avx<B>(row, cols, full, tail);
    } else {
        float* o = (float*)out;
        auto full = [&](int64_t off, __m512 w, int) { _mm512_storeu_ps(o + off, w); };
        auto tail = [&](int64_t off, __m512 w, __mmask16 m) { _mm512_mask_storeu_ps(o + off, m, w); };
        walk_row_avx<B>(row, cols, full, tail);
    }
#elif defined(LC_AVX2)
    if (bf16) {
        uint16_t* o = (uint16_t*)out;
        auto full = [&](int64_t off, __m256 w, int) { _mm_storeu_si128((__m128i*)(o + off), float_to_bf16_avx2(w)); };
        auto tail = [&](int64_t off, __m256 w, int n) {
            alignas(16) uint16_t buf[8];
            _mm_store_si128((__m128i*)buf, float_to_bf16_avx2(w));
            memcpy(o + off, buf, (size_t)n * 2);
        };
        walk_row_avx2<B>(row, cols, full, tail);
    } else {
        float* o = (float*)out;
        auto full = [&](int64_t off, __m256 w, int) { _mm256_storeu_ps(o + off, w); };
        auto tail = [&](int64_t off, __m256 w, int n) { _mm256_maskstore_ps(o + off, lanes_below(n), w); };
        walk_row_avx2<B>(row, cols, full, tail);
    }
#else
    float buf[256];
    walk_row_portable<B>(row, cols, buf, 256, [&](int64_t off, int n) {
        if (bf16)
            for (int k = 0; k < n; ++k) ((uint16_t*)out)[off + k] = float_to_bf16(buf[k]);
        else
            memcpy((float*)out + off, buf, (size_t)n * 4);
    });
#endif
}

#include "integer_activations.h"

// ---------------------------------------------------------------------------------------------------------
// Dispatch by type.
// ---------------------------------------------------------------------------------------------------------

using TileFn = void (*)(const uint8_t*, int64_t, int, int64_t, const float*, int64_t, float*, int64_t);
using DequantFn = void (*)(const uint8_t*, int64_t, void*, int);

struct TypeOps {
    int qk, bytes;
    std::array<TileFn, MAX_TILE + 1> tiles;  // tiles[n]: n rows of x
    DequantFn dequant;
#ifdef LC_AVX2
    // the same with integer activations, [0] 8 bits and [1] 16 bits; null where the type has none
    std::array<std::array<IntTileFn, MAX_TILE + 1>, 2> int_tiles;
#endif
};

template <class B, size_t... I>
constexpr TypeOps make_ops(std::index_sequence<I...>) {
#ifdef LC_AVX2
    if constexpr (!std::is_void_v<typename IntOf<B>::type>)
        return TypeOps{B::QK, B::BYTES, {nullptr, &tile<B, (int)I + 1>...}, &dequant_row<B>,
                       {{{nullptr, &tile_int<B, false, (int)I + 1>...}, {nullptr, &tile_int<B, true, (int)I + 1>...}}}};
    else
        return TypeOps{B::QK, B::BYTES, {nullptr, &tile<B, (int)I + 1>...}, &dequant_row<B>, {}};
#else
    return TypeOps{B::QK, B::BYTES, {nullptr, &tile<B, (int)I + 1>...}, &dequant_row<B>};
#endif
}

template <class B>
const TypeOps* ops() {
    static const TypeOps table = make_ops<B>(std::make_index_sequence<MAX_TILE>{});
    return &table;
}

const TypeOps* ops_for(int qtype) {
    switch (qtype) {
        case F32: return ops<TF32>();
        case F16: return ops<TF16>();
        case BF16: return ops<TBF16>();
        case Q4_0: return ops<TQ4_0>();
        case Q4_1: return ops<TQ4_1>();
        case Q5_0: return ops<TQ5_0>();
        case Q5_1: return ops<TQ5_1>();
        case Q8_0: return ops<TQ8_0>();
        case Q4_K: return ops<TQ4_K>();
        case Q5_K: return ops<TQ5_K>();
        case Q6_K: return ops<TQ6_K>();
        default: return nullptr;
    }
}

}  // namespace

extern "C" {

// One weight of a (multi-)matmul: `rows` x `cols` values in `qtype` blocks, row r at data + r*row_bytes,
// written to columns [out_col, out_col + rows) of y.
struct localchat_qweight {
    const uint8_t* data;
    int64_t qtype, rows, cols, row_bytes, out_col;
};

// Elements and bytes per block of `qtype` (1 and the element size for float rows); -1 if unsupported.
int localchat_quant_block(int qtype, int* qk, int* bytes) {
    const TypeOps* o = ops_for(qtype);
    if (!o) return -1;
    *qk = o->qk;
    *bytes = o->bytes;
    return 0;
}

// 1 when this build has integer-activation kernels for `qtype` (integer_activations.h), else 0.
int localchat_quant_has_integer(int qtype) {
#ifdef LC_AVX2
    const TypeOps* o = ops_for(qtype);
    return o && o->int_tiles[0][1] ? 1 : 0;
#else
    (void)qtype;
    return 0;
#endif
}

// Tests: how long a chunk may stay claimed before a waiting thread runs it again (ns; -1: the measured default),
// and how many chunks were run again so far.
int64_t localchat_chunks_debug(int64_t stuck_ns) {
    __atomic_store_n(&chunks::stuck_override, stuck_ns, __ATOMIC_RELAXED);
    return __atomic_load_n(&chunks::reruns, __ATOMIC_RELAXED);
}

// 1 when the AVX-512 kernels were compiled in, 2 for the AVX2 ones, 0 for the portable ones.
int localchat_quant_isa() {
#if defined(LC_AVX512)
    return 1;
#elif defined(LC_AVX2)
    return 2;
#else
    return 0;
#endif
}

}  // extern "C"

namespace {

int check(const localchat_qweight& w, int64_t in) {
    const TypeOps* o = ops_for((int)w.qtype);
    if (!o) return -1;
    if (w.cols != in || w.cols % o->qk != 0 || w.row_bytes < w.cols / o->qk * o->bytes || w.rows < 0) return -2;
    return 0;
}

// The rows of weight `w` (cost `unit` each, starting at `before` in the call's cost order) that fall in
// [lo, hi): a row belongs to the thread whose range holds the row's first unit. Integer arithmetic, so
// neighbouring threads agree on every boundary.
inline void rows_in(int64_t before, int64_t unit, int64_t rows, int64_t lo, int64_t hi, int64_t* r0, int64_t* r1) {
    auto first_at_or_after = [&](int64_t c) -> int64_t {
        if (c <= before) return 0;
        return std::min(rows, (c - before + unit - 1) / unit);
    };
    *r0 = first_at_or_after(lo);
    *r1 = first_at_or_after(hi);
}

// bits (8 or 16; 0: float32): round x to integers for the type's integer-activation kernel where this build
// has one (integer_activations.h).
void run_rows(const localchat_qweight& w, int64_t r0, int64_t r1, const float* x, int64_t T, int64_t ldx, float* y,
              int64_t ldy, int bits) {
    const TypeOps* o = ops_for((int)w.qtype);
#ifdef LC_AVX2
    if (bits && o->int_tiles[0][1]) {
        const bool wide = bits == 16;
        const auto& tiles = o->int_tiles[wide];
        const IntRow* xq = int_buffer().quantize(x, T, ldx, w.cols, wide);
        for (int64_t r = r0; r < r1; r += 16) {
            const int n = (int)std::min<int64_t>(16, r1 - r);
            for (int64_t t = 0; t < T; t += MAX_TILE) {
                const int tt = (int)std::min<int64_t>(MAX_TILE, T - t);
                tiles[tt](w.data + r * w.row_bytes, w.row_bytes, n, w.cols, xq + t, y + t * ldy + w.out_col + r, ldy);
            }
        }
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r += 16) {
        const int n = (int)std::min<int64_t>(16, r1 - r);
        const uint8_t* rows = w.data + r * w.row_bytes;
        // x tiles inside the row group: the group's weights (a few KB) stay in L1/L2 across the tiles.
        for (int64_t t = 0; t < T; t += MAX_TILE) {
            const int tt = (int)std::min<int64_t>(MAX_TILE, T - t);
            o->tiles[tt](rows, w.row_bytes, n, w.cols, x + t * ldx, ldx, y + t * ldy + w.out_col + r, ldy);
        }
    }
}

// ~3 bytes' time per 16 multiply-adds per x row on these cores; only the split between threads uses it.
inline int64_t unit_of(const localchat_qweight& w, int64_t T) { return w.row_bytes + (w.cols * T) / 5 + 1; }

// Part `part` [lo, hi) of `total` cost units cut into `parts`.
inline void share_of(int64_t total, int part, int parts, int64_t* lo, int64_t* hi) {
    *lo = (int64_t)((__int128)total * part / parts);
    *hi = (int64_t)((__int128)total * (part + 1) / parts);
}

// y[t, w.out_col + r] = x @ W^T for the rows r of chunk c (of n) of the weights' summed cost.
void matmul_chunk(const localchat_qweight* ws, int nw, const float* x, int64_t T, int64_t ldx, float* y, int64_t ldy,
                  int c, int n, int bits) {
    int64_t total = 0, before = 0, lo, hi;
    for (int i = 0; i < nw; ++i) total += unit_of(ws[i], T) * ws[i].rows;
    share_of(total, c, n, &lo, &hi);
    for (int i = 0; i < nw; ++i) {
        const int64_t unit = unit_of(ws[i], T);
        int64_t r0, r1;
        rows_in(before, unit, ws[i].rows, lo, hi, &r0, &r1);
        if (r0 < r1) run_rows(ws[i], r0, r1, x, T, ldx, y, ldy, bits);
        before += unit * ws[i].rows;
    }
}

}  // namespace

extern "C" {

// y[t, w.out_col + r] = sum_c x[t, c] * W_w[r, c] for every weight w (all with `in` columns) and t < T.
// Threads split the summed cost of all weights' rows (bytes streamed plus multiply-adds), so one parallel
// region covers fused projections stored as separate tensors, even of different types.
// activation_bits 8 or 16 (0: float32): the types with integer-activation kernels in this build round x to
// that many bits per block of 32 (integer_activations.h).
// Returns 0, -1 for an unsupported type, -2 for a shape that doesn't fit the type.
int localchat_quant_matmul(const float* x, int64_t T, int64_t ldx, int64_t in, const localchat_qweight* ws, int n,
                           float* y, int64_t ldy, int num_threads, int activation_bits) {
    int64_t total = 0;
    if (n <= 0 || n > 64) return -2;
    for (int i = 0; i < n; ++i) {
        if (int err = check(ws[i], in)) return err;
        total += unit_of(ws[i], T) * ws[i].rows;
    }
    if (T <= 0 || total == 0) return 0;
    if (num_threads <= 1 || total < SERIAL_COST) {
        matmul_chunk(ws, n, x, T, ldx, y, ldy, 0, 1, activation_bits);
        return 0;
    }
    // Chunks of y's rows (chunks::share): a thread the scheduler takes away holds the others up by one chunk.
    const int pieces = CHUNKS_PER_THREAD * num_threads;
    chunks::Board& board = chunks::board();
    board.reset(1, pieces);
#pragma omp parallel num_threads(num_threads)
    {
        chunks::share(board.phase(0), pieces, omp_get_thread_num(), omp_get_num_threads(), [&](int c) { matmul_chunk(ws, n, x, T, ldx, y, ldy, c, pieces, activation_bits); });
    }
    return 0;
}

// out[r, :cols] = the values of row r (float32, or bfloat16 rounded to nearest even when bf16 != 0), rows
// ld_out elements apart.
int localchat_quant_dequantize(const localchat_qweight* w, void* out, int bf16, int64_t ld_out, int num_threads) {
    if (int err = check(*w, w->cols)) return err;
    const TypeOps* o = ops_for((int)w->qtype);
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(std::max(1, num_threads))
    for (int64_t r = 0; r < w->rows; ++r)
        o->dequant((const uint8_t*)w->data + r * w->row_bytes, w->cols, (char*)out + r * ld_out * esize, bf16);
    return 0;
}

}  // extern "C"
