/* moe-offload native 4-bit matmul for small M on AVX2 + FMA (kernels.py: NativeQ4Linear, layout "r64").
 *
 *   y [M, N] = x [M, K] @ W^T,   W[n, k] = q[n, k]·s[g, n] + m0[g, n],   m0 = m − 8·s,   g = k / gs
 *
 * Weights: codes q < 16, row-major, each row in chunks of 64 codes: byte j of a chunk holds codes j (low nibble)
 * and j + 32 (high nibble), so one 32-byte load is two 32-code blocks in natural order; a last chunk of 32 codes
 * (K ≡ 32 mod 64) holds codes j and j + 16 in its byte j. Scales and offsets sz: bf16 (s, m) pairs; those of
 * the four-row tile t (rows 4t .. 4t + 3) for group g at sz[t·st + g·sg] (sn = 2: the four pairs adjacent).
 * kernels.py passes [N/4, G, 4, 2] (layout r64t: st = 8G, sg = 8, the tile's meta one stream) or torch's
 * [G, N, 2] (r64: st = 8, sg = 2N; rows past the last tile at sz[n·sn]). Layout r64i (il = 1): the codes of
 * each tile of four rows interleaved by 32-byte chunk, chunk c of the tile's row r at 128·c + 32·r, so a tile
 * is one sequential stream (N % 4 == 0, K % 64 == 0).
 * Activations: each row of x is quantized once per call to int8 per group (scale amax/127, round to nearest),
 * shared by all N rows (x̂ = dx·xq). Per group:
 *   y += s·dx·Σ q·xq   (maddubs: unsigned codes × signed int8, int16 sums of ≤ 8 blocks stay below 2^15)
 *      + m0·Σ x̂
 * Threads: the N rows are split over `nthreads` (OpenMP; the process's libgomp, torch's own when loaded).
 */
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { Q4_F32 = 0, Q4_BF16 = 1, Q4_F16 = 2 }; /* activation dtypes (kernels.py: DTYPES) */
#define Q4_PARALLEL_BYTES (256u << 10) /* code bytes × rows below which one thread does the call */

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* 8 activations as fp32 from x of dtype dt (Q4_F32, Q4_BF16, Q4_F16) */
static inline __m256 load8(const void *x, int dt, size_t i) {
    if (dt == Q4_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    if (dt == Q4_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_loadu_ps((const float *)x + i);
}

/* one activation as fp32 from x of dtype dt */
static inline float load1(const void *x, int dt, size_t i) {
    if (dt == Q4_BF16) return bf2f(((const uint16_t *)x)[i]);
    if (dt == Q4_F16) return _cvtsh_ss(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

/* one row x [K] (fp32, bf16 or fp16) -> xq [K] int8, dx [G] scales, xs [G] = dx·Σ xq: the offset term uses the same
 * rounded x as the codes' term, so the error is Σ W·(x̂ − x) (W centred), not Σ q·s·(x̂ − x) (W − m0, large) */
static void quantize_row(const void *x, int dt, int K, int gs, int8_t *xq, float *dx, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int g0 = 0; g0 < K; g0 += gs) { /* gs is a multiple of 32 */
        __m256 f[8];                     /* up to 256 values of one group, 8 per register, 4 registers a pass */
        __m256 mx = _mm256_setzero_ps();
        for (int k = 0; k < gs; k += 8) {
            __m256 v = load8(x, dt, g0 + k);
            if (gs <= 64) f[k / 8] = v;
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float amax = _mm_cvtss_f32(m), d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i isum = _mm256_setzero_si256();
        for (int k = 0; k < gs; k += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = gs <= 64 ? f[k / 8 + j] : load8(x, dt, g0 + k + 8 * j);
                q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v, vid)); /* round to nearest even (MXCSR default) */
                isum = _mm256_add_epi32(isum, q[j]);
            }
            /* packs work per 128-bit lane: [q0 q1 | ..] -> fix the order with one permute */
            __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
            __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xq + g0 + k), p8);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        dx[g0 / gs] = d;
        xs[g0 / gs] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* One weight row · MB ≤ 4 quantized activation rows (xq, dx, xs of row i at i·K, i·G): each 32-byte chunk of
 * codes is loaded and unpacked once for all MB rows. gs a multiple of 64 (≤ 256), or 32. Used for the N mod 4
 * rows left after the four-row tiles (and for meta whose rows are not adjacent, sn != 2). */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *w, const uint16_t *sz, long sg, int K,
                                                           int gs, const int8_t *xq, const float *dx,
                                                           const float *xs, int G, const int MB, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    float macc[4];
    for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps(), macc[i] = 0.f;
    if (gs == 32) {
        const int C = K / 64;
        for (int c = 0; c <= C; c++) {
            __m256i lo, hi;
            if (c < C) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
                lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            } else if (K % 64) { /* the last 32 codes: byte j holds codes j and j + 16 */
                __m128i v = _mm_loadu_si128((const __m128i *)(w + 32 * C)), m4h = _mm_set1_epi8(0x0f);
                lo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4h), _mm_and_si128(v, m4h));
                hi = _mm256_setzero_si256();
            } else {
                break;
            }
            const int g = 2 * c, two = c < C;
            const float s0 = bf2f(sz[g * sg]), m0 = bf2f(sz[g * sg + 1]) - 8.f * s0;
            const float s1 = two ? bf2f(sz[(g + 1) * sg]) : 0.f;
            const float m1 = two ? bf2f(sz[(g + 1) * sg + 1]) - 8.f * s1 : 0.f;
            for (int i = 0; i < MB; i++) {
                const int8_t *x = xq + (size_t)i * K + 64 * c;
                const float *d = dx + (size_t)i * G, *t = xs + (size_t)i * G;
                __m256i i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)), ones);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(s0 * d[g]), _mm256_cvtepi32_ps(i0), acc[i]);
                macc[i] += m0 * t[g];
                if (two) {
                    __m256i i1 = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))), ones);
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(s1 * d[g + 1]), _mm256_cvtepi32_ps(i1), acc[i]);
                    macc[i] += m1 * t[g + 1];
                }
            }
        }
    } else {
        const int cpg = gs / 64;
        for (int g = 0; g < G; g++) {
            __m256i s16[4];
            for (int i = 0; i < MB; i++) s16[i] = _mm256_setzero_si256();
            for (int c = 0; c < cpg; c++) {
                const int o = g * cpg + c;
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * o));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int i = 0; i < MB; i++) {
                    const int8_t *x = xq + (size_t)i * K + 64 * o;
                    __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x));
                    __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32)));
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_add_epi16(p0, p1));
                }
            }
            const float s = bf2f(sz[g * sg]), m0 = bf2f(sz[g * sg + 1]) - 8.f * s;
            for (int i = 0; i < MB; i++) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(s * dx[(size_t)i * G + g]), f, acc[i]);
                macc[i] += m0 * xs[(size_t)i * G + g];
            }
        }
    }
    for (int i = 0; i < MB; i++) out[i] = hsum(acc[i]) + macc[i];
}

/* Four weight rows n..n+3 · one quantized activation row: the activation block is loaded once for the four, and
 * their (s, m) pairs of one group are one 16-byte load (sz rows adjacent: sn = 2), so the per-group scale work
 * is vector work shared by four rows instead of scalar work per row. For M > 1 it runs once per activation
 * row while the four rows' codes (2·K bytes) stay in L1/L2. */
/* Prefetching ahead of the tile: row-major tiles (r64, r64t) fetch each row 8 rows (two tiles) ahead, as the
 * hardware prefetcher does not follow four interleaved row streams well; interleaved tiles (r64i: chunk c of
 * row r at 128·c + 32·r) are one sequential stream, fetched Q4_IL_AHEAD bytes ahead. */
#ifndef Q4_AHEAD
#define Q4_AHEAD 8
#endif
#ifndef Q4_IL_AHEAD
#define Q4_IL_AHEAD 2048
#endif
/* Σ of unsigned codes × signed int8 activations: with VNNI (AVX-VNNI or AVX-512 VNNI + VL, native/__init__.py adds
 * the flag where the CPU has it) one instruction gives int32 sums of four adjacent products; without, maddubs gives
 * int16 sums of two (≤ 8 blocks of them summed stay below 2^15) and madd widens them once per group. The integers
 * are the same, so both builds give the same bits. */
#if defined(__AVXVNNI__)
#define Q4_VNNI 1
#define Q4_DOT(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q4_VNNI 1
#define Q4_DOT(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define Q4_VNNI 0
#define Q4_DOT(acc, u, s) _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s))
#endif
#if Q4_VNNI
#define Q4_WIDEN(a) (a)
#else
#define Q4_WIDEN(a) _mm256_madd_epi16(a, ones)
#endif

#define Q4_PREFETCH(c)                                                                                             \
    if (!((c)&1)) {                                                                                                \
        if (il) {                                                                                                  \
            const char *p = (const char *)(w + Q4_IL_AHEAD + 128 * (size_t)(c));                                   \
            _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);                                       \
            _mm_prefetch(p + 128, _MM_HINT_T0), _mm_prefetch(p + 192, _MM_HINT_T0);                                \
        } else {                                                                                                   \
            _mm_prefetch((const char *)(w0 + Q4_AHEAD * rb + 32 * (c)), _MM_HINT_T0);                              \
            _mm_prefetch((const char *)(w1 + Q4_AHEAD * rb + 32 * (c)), _MM_HINT_T0);                              \
            _mm_prefetch((const char *)(w2 + Q4_AHEAD * rb + 32 * (c)), _MM_HINT_T0);                              \
            _mm_prefetch((const char *)(w3 + Q4_AHEAD * rb + 32 * (c)), _MM_HINT_T0);                              \
        }                                                                                                          \
    }
static inline __attribute__((always_inline)) void dot4_m1(const uint8_t *w, size_t rb, const uint16_t *sz, long sg,
                                                          int K, int gs, const int8_t *xq, const float *dx,
                                                          const float *xs, int G, float *out, const int il) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m128i hi16 = _mm_set1_epi32((int)0xffff0000u);
    const __m128 eight = _mm_set1_ps(8.f);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m128 macc = _mm_setzero_ps();
    const size_t rs = il ? 32 : rb, cs = il ? 128 : 32; /* row, chunk strides (bytes) */
    const uint8_t *w0 = w, *w1 = w + rs, *w2 = w + 2 * rs, *w3 = w + 3 * rs;
#define Q4_META(g)                                                                                                 \
    __m128i u = _mm_loadu_si128((const __m128i *)(sz + (size_t)(g) * sg));                                         \
    __m128 s = _mm_castsi128_ps(_mm_slli_epi32(u, 16)), m = _mm_castsi128_ps(_mm_and_si128(u, hi16));              \
    __m128 sd = _mm_mul_ps(s, _mm_set1_ps(dx[g]));                                                                 \
    macc = _mm_fmadd_ps(_mm_fnmadd_ps(eight, s, m), _mm_set1_ps(xs[g]), macc);
#define Q4_ACC(a, i, lane)                                                                                         \
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Q4_WIDEN(i)),                                                           \
                        _mm256_broadcastss_ps(_mm_shuffle_ps(sd, sd, lane)), a);
    if (gs == 32) {
        for (int c = 0; c < K / 64; c++) {
            Q4_PREFETCH(c)
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32));
            __m256i l[4], h[4];
            const uint8_t *ws[4] = {w0, w1, w2, w3};
            for (int r = 0; r < 4; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(ws[r] + cs * c));
                l[r] = Q4_DOT(_mm256_setzero_si256(), _mm256_and_si256(v, m4), x0);
                h[r] = Q4_DOT(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), x1);
            }
            {
                Q4_META(2 * c)
                Q4_ACC(a0, l[0], 0x00) Q4_ACC(a1, l[1], 0x55) Q4_ACC(a2, l[2], 0xaa) Q4_ACC(a3, l[3], 0xff)
            }
            {
                Q4_META(2 * c + 1)
                Q4_ACC(a0, h[0], 0x00) Q4_ACC(a1, h[1], 0x55) Q4_ACC(a2, h[2], 0xaa) Q4_ACC(a3, h[3], 0xff)
            }
        }
        if (K % 64) { /* (row-major tiles only: r64i has K % 64 == 0) */
            const int c = K / 64;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c));
            const __m128i m4h = _mm_set1_epi8(0x0f);
            __m256i l[4];
            const uint8_t *ws[4] = {w0, w1, w2, w3};
            for (int r = 0; r < 4; r++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(ws[r] + 32 * c));
                __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4h), _mm_and_si128(v, m4h));
                l[r] = Q4_DOT(_mm256_setzero_si256(), q, x0);
            }
            Q4_META(2 * c)
            Q4_ACC(a0, l[0], 0x00) Q4_ACC(a1, l[1], 0x55) Q4_ACC(a2, l[2], 0xaa) Q4_ACC(a3, l[3], 0xff)
        }
    } else {
        const int cpg = gs / 64;
        for (int g = 0; g < G; g++) {
            __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0;
            for (int c = g * cpg; c < (g + 1) * cpg; c++) {
                Q4_PREFETCH(c)
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32));
#define Q4_ROW(t, wr)                                                                                              \
    {                                                                                                              \
        __m256i v = _mm256_loadu_si256((const __m256i *)(wr + cs * c));                                            \
        t = Q4_DOT(Q4_DOT(t, _mm256_and_si256(v, m4), x0), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), x1);     \
    }
                Q4_ROW(t0, w0) Q4_ROW(t1, w1) Q4_ROW(t2, w2) Q4_ROW(t3, w3)
#undef Q4_ROW
            }
            Q4_META(g)
            Q4_ACC(a0, t0, 0x00) Q4_ACC(a1, t1, 0x55) Q4_ACC(a2, t2, 0xaa) Q4_ACC(a3, t3, 0xff)
        }
    }
#undef Q4_META
#undef Q4_ACC
#undef Q4_PREFETCH
    float mm[4];
    _mm_storeu_ps(mm, macc);
    out[0] = hsum(a0) + mm[0];
    out[1] = hsum(a1) + mm[1];
    out[2] = hsum(a2) + mm[2];
    out[3] = hsum(a3) + mm[3];
}

static inline void store_y(void *y, int dt, size_t i, float v) {
    if (dt == Q4_BF16)
        ((uint16_t *)y)[i] = f2bf(v);
    else if (dt == Q4_F16)
        ((uint16_t *)y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); /* as torch's .to(float16) */
    else
        ((float *)y)[i] = v;
}

/* A matrix's fixed arguments, set once per unit (kernels.py), so a call passes 6 arguments through ctypes */
typedef struct {
    const uint8_t *w;
    const uint16_t *sz;
    long sg, sn, st;
    int N, K, gs, il; /* il: tiles of 4 rows interleaved by 32-byte chunk (r64i; N % 4 == 0, K % 64 == 0) */
} q4_matrix;

int q4_mm(const void *x, void *y, int xdt, int M, int N, int K, int gs, const uint8_t *w, const uint16_t *sz,
          long sg, long sn, long st, int il, int nthreads);

int q4_call(const void *x, void *y, int xdt, int M, const q4_matrix *m, int nthreads) {
    return q4_mm(x, y, xdt, M, m->N, m->K, m->gs, m->w, m->sz, m->sg, m->sn, m->st, m->il, nthreads);
}

/* Nibble orders -> r64 (kernels.LAYOUTS): torch's int4pack orders are blocks of B rows stored k-major, byte
 * (k, j) of a block holding rows j and j + B/2 ("b64", "b32": halves) or rows 2j and 2j + 1 ("p32": pairs),
 * then the N mod B tail rows as pairs. One pass per block; the block's r64 rows (B·K/2 bytes) stay in cache. */
static void block_to_r64(const uint8_t *src, uint8_t *dst, int rows, int K, int pairs) {
    const int h = rows / 2, C = K / 64;
    for (int k = 0; k < K; k++) {
        const int c = k / 64, p = k % 64, half = c < C ? 32 : 16;
        const size_t at = (size_t)c * 32 + p % half;
        const int sh = p / half ? 4 : 0;
        const uint8_t *b = src + (size_t)k * h;
        for (int j = 0; j < h; j++) {
            const int r0 = pairs ? 2 * j : j, r1 = pairs ? 2 * j + 1 : j + h;
            dst[(size_t)r0 * (K / 2) + at] |= (uint8_t)((b[j] & 15) << sh);
            dst[(size_t)r1 * (K / 2) + at] |= (uint8_t)((b[j] >> 4) << sh);
        }
    }
}

/* src [N·K/2] in a torch order with blocks of B rows (pairs: p32) -> dst [N·K/2], zero-filled by the caller */
int q4_to_r64(const uint8_t *src, uint8_t *dst, int N, int K, int B, int pairs, int nthreads) {
    if (K % 32 || N % 2 || B % 2) return -1;
    const int nb = N / B, tail = N - nb * B;
    const size_t rb = (size_t)K / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int b = 0; b <= nb; b++) {
        if (b < nb)
            block_to_r64(src + (size_t)b * B * rb, dst + (size_t)b * B * rb, B, K, pairs);
        else if (tail)
            block_to_r64(src + (size_t)nb * B * rb, dst + (size_t)nb * B * rb, tail, K, 1);
    }
    return 0;
}

int q4_version(void) { return 14; }

int q4_vnni(void) { return Q4_VNNI; }

/* The rows of y [M, N] = xq·W^T (activations quantized already) that this thread's share of the work units
 * gives (an orphaned `omp for`: inside a parallel region the units are split over its threads, outside it one
 * thread runs them all). y is of dtype ydt. */
static void mm_quantized(const int8_t *xq, const float *dx, const float *xs, int M, int N, int K, int gs,
                         const uint8_t *w, const uint16_t *sz, long sg, long sn, long st, int il, void *y,
                         int ydt) {
    const int G = K / gs;
    const size_t rb = (size_t)K / 2;
    const int tiles = sn == 2 ? N / 4 : 0; /* four weight rows at a time (per activation row, the four rows'
                                             * codes reused from L1/L2); the rest one by one */
    const int rows = N - 4 * tiles, units = tiles + rows;
#pragma omp for schedule(static)
    for (int t = 0; t < units; t++) {
        if (t < tiles) {
            for (int i = 0; i < M; i++) {
                float r[4];
                if (il)
                    dot4_m1(w + rb * 4 * t, rb, sz + st * (size_t)t, sg, K, gs, xq + (size_t)i * K,
                            dx + (size_t)i * G, xs + (size_t)i * G, G, r, 1);
                else
                    dot4_m1(w + rb * 4 * t, rb, sz + st * (size_t)t, sg, K, gs, xq + (size_t)i * K,
                            dx + (size_t)i * G, xs + (size_t)i * G, G, r, 0);
                for (int j = 0; j < 4; j++) store_y(y, ydt, (size_t)i * N + 4 * (size_t)t + j, r[j]);
            }
            continue;
        }
        const int n = 4 * tiles + (t - tiles);
        const uint8_t *wr = w + rb * n;
        const uint16_t *sr = sz + sn * n;
        for (int i0 = 0; i0 < M; i0 += 4) { /* the row's codes stay in L1 across the blocks of 4 x rows */
            const int8_t *q = xq + (size_t)i0 * K;
            const float *d = dx + (size_t)i0 * G, *s = xs + (size_t)i0 * G;
            float r[4];
            switch (M - i0 < 4 ? M - i0 : 4) {
            case 1: dot_rows(wr, sr, sg, K, gs, q, d, s, G, 1, r); break;
            case 2: dot_rows(wr, sr, sg, K, gs, q, d, s, G, 2, r); break;
            case 3: dot_rows(wr, sr, sg, K, gs, q, d, s, G, 3, r); break;
            default: dot_rows(wr, sr, sg, K, gs, q, d, s, G, 4, r);
            }
            for (int i = i0; i < M && i < i0 + 4; i++) store_y(y, ydt, (size_t)i * N + n, r[i - i0]);
        }
    }
}

static int shape_ok(int K, int gs) { return !(K % 32 || gs % 32 || K % gs || gs > 256 || (gs % 64 && gs != 32)); }

/* y [M, N] = x [M, K] @ W^T; x and y of dtype xdt (Q4_F32, Q4_BF16, Q4_F16). Returns 0; -1 for a shape it
 * refuses, -2 when out of memory. */
int q4_mm(const void *x, void *y, int xdt, int M, int N, int K, int gs, const uint8_t *w, const uint16_t *sz,
          long sg, long sn, long st, int il, int nthreads) {
    if (!shape_ok(K, gs) || M < 1 || (il && (N % 4 || K % 64 || sn != 2))) return -1;
    const int G = K / gs;
    int8_t *xq = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    float *dx = malloc(sizeof(float) * 2 * (size_t)M * G);
    if (!xq || !dx) {
        free(xq);
        free(dx);
        return -2;
    }
    float *xs = dx + (size_t)M * G;
    const size_t esz = xdt == Q4_F32 ? 4 : 2;
    for (int i = 0; i < M; i++)
        quantize_row((const char *)x + esz * (size_t)i * K, xdt, K, gs, xq + (size_t)i * K, dx + (size_t)i * G,
                     xs + (size_t)i * G);
    /* small calls stay on the caller's thread: a fork/join costs more than they do (and on a busy machine a
     * descheduled second thread stalls the call for a whole time slice) */
    if ((size_t)N * K / 2 * (size_t)M < Q4_PARALLEL_BYTES) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    mm_quantized(xq, dx, xs, M, N, K, gs, w, sz, sg, sn, st, il, y, xdt);
    free(xq);
    free(dx);
    return 0;
}

/* One SwiGLU expert in one call: y [M, D] = down(silu(g) * u), [g | u] = gate_up(x) [M, 2I], x and y of dtype
 * xdt. gate_up (N = 2I, K = D) and down (N = D, K = I) as q4_call's matrices. The intermediate h stays fp32
 * (no rounding to xdt between the matrices) and is rounded to int8 per group of down's, as any activation.
 * One parallel region for the three steps (the work units of each split over its threads, a barrier between
 * them), instead of a fork/join per matrix and the Python ops between. Returns as q4_mm. */
int q4_expert(const void *x, void *y, int xdt, int M, const q4_matrix *gu, const q4_matrix *dn, int nthreads) {
    const int D = gu->K, I2 = gu->N, I = I2 / 2;
    if (!shape_ok(D, gu->gs) || !shape_ok(I, dn->gs) || I2 % 2 || dn->K != I || dn->N != D || M < 1) return -1;
    if ((gu->il && (I2 % 4 || D % 64 || gu->sn != 2)) || (dn->il && (D % 4 || I % 64 || dn->sn != 2))) return -1;
    const int G1 = D / gu->gs, G2 = I / dn->gs;
    int8_t *xq = aligned_alloc(64, ((size_t)M * D + 63) / 64 * 64);
    int8_t *hq = aligned_alloc(64, ((size_t)M * I + 63) / 64 * 64);
    float *h = malloc(sizeof(float) * (size_t)M * I2);
    float *dx = malloc(sizeof(float) * 2 * ((size_t)M * G1 + (size_t)M * G2));
    if (!xq || !hq || !h || !dx) {
        free(xq), free(hq), free(h), free(dx);
        return -2;
    }
    float *xs = dx + (size_t)M * G1, *dh = xs + (size_t)M * G1, *hs = dh + (size_t)M * G2;
    const size_t esz = xdt == Q4_F32 ? 4 : 2;
    for (int i = 0; i < M; i++)
        quantize_row((const char *)x + esz * (size_t)i * D, xdt, D, gu->gs, xq + (size_t)i * D,
                     dx + (size_t)i * G1, xs + (size_t)i * G1);
    if ((size_t)3 * I * D / 2 * (size_t)M < Q4_PARALLEL_BYTES) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        mm_quantized(xq, dx, xs, M, I2, D, gu->gs, gu->w, gu->sz, gu->sg, gu->sn, gu->st, gu->il, h, Q4_F32);
        /* (the implicit barrier of the omp for: every row of h is written) */
#pragma omp for schedule(static)
        for (int i = 0; i < M; i++) {
            float *r = h + (size_t)i * I2; /* r[j] = silu(g_j) * u_j, in place over the gate half */
            for (int j = 0; j < I; j++) {
                const float g = r[j];
                r[j] = g / (1.f + expf(-g)) * r[I + j];
            }
            quantize_row(r, Q4_F32, I, dn->gs, hq + (size_t)i * I, dh + (size_t)i * G2, hs + (size_t)i * G2);
        }
        mm_quantized(hq, dh, hs, M, D, I, dn->gs, dn->w, dn->sz, dn->sg, dn->sn, dn->st, dn->il, y, xdt);
    }
    free(xq), free(hq), free(h), free(dx);
    return 0;
}

/* ---- one token through a MoE layer's experts in one call -------------------------------------------------
 * A SwiGLU experts (each q4_expert's arithmetic: fp32 intermediate, rounded to int8 per group of down's), their
 * outputs weighted and summed as the dispatch does it in torch, each step rounded to xdt:
 *   y_e = rnd(down_e(·)),  p_e = rnd(y_e · w_e),  y = p_0, then y = rnd(y + p_e) for e = 1 .. A−1
 * (the caller passes the experts in ascending expert order and w_e as the fp32 value torch multiplies by), so
 * the result equals the per-expert calls and the Python sum bit for bit. each != 0: y [A, D] holds every p_e
 * instead (the caller sums them with experts it got elsewhere). One parallel region: the A gate_up products
 * split over the threads as one list of four-row tiles, then SiLU·up per expert, then down by tiles of D, each
 * tile summing its experts in order. Needs four-row tiles (N % 4 == 0, meta sn = 2) and one group size per
 * matrix kind; returns -1 for anything else (the caller takes the per-expert path), -2 when out of memory. */
static inline float rnd(int dt, float v) {
    if (dt == Q4_BF16) return bf2f(f2bf(v));
    if (dt == Q4_F16) return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off"))) /* a product then a sum, each rounded: never one FMA */
#endif
static void weigh4(const float *r, float w, int dt, float *p) {
    for (int j = 0; j < 4; j++) {
        const float y = rnd(dt, r[j]);
        const float q = y * w;
        p[j] = rnd(dt, q);
    }
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void add4(float *acc, const float *p, int dt) {
    for (int j = 0; j < 4; j++) {
        const float s = acc[j] + p[j];
        acc[j] = rnd(dt, s);
    }
}

/* Expert e's four outputs r of down's tile t (rows 4t..): weighed by w, then stored as its own ([A, D], each) or
 * summed into acc in expert order, each step rounded to xdt (q4_moe and h16_moe: experts._dispatch_one's numbers) */
static inline void fold4(const float *r, int e, float w, int xdt, int each, void *y, int D, int t, float *acc) {
    float p[4];
    weigh4(r, w, xdt, p);
    if (each)
        for (int j = 0; j < 4; j++) store_y(y, xdt, (size_t)e * D + 4 * (size_t)t + j, p[j]);
    else if (e == 0)
        memcpy(acc, p, sizeof p);
    else
        add4(acc, p, xdt);
}

static inline void tile4(const q4_matrix *m, int t, const int8_t *xq, const float *dx, const float *xs, float *r) {
    const size_t rb = (size_t)m->K / 2;
    if (m->il)
        dot4_m1(m->w + rb * 4 * t, rb, m->sz + m->st * (size_t)t, m->sg, m->K, m->gs, xq, dx, xs, m->K / m->gs, r,
                1);
    else
        dot4_m1(m->w + rb * 4 * t, rb, m->sz + m->st * (size_t)t, m->sg, m->K, m->gs, xq, dx, xs, m->K / m->gs, r,
                0);
}

static int moe_ok(const q4_matrix *m, int N, int K, int gs) {
    return m->N == N && m->K == K && m->gs == gs && m->sn == 2 && N % 4 == 0 && (!m->il || K % 64 == 0);
}

int q4_moe(const void *x, void *y, int xdt, int A, const q4_matrix *const *gu, const q4_matrix *const *dn,
           const float *wt, int each, int nthreads) {
    if (A < 1) return -1;
    const int D = gu[0]->K, I2 = gu[0]->N, I = I2 / 2, gs1 = gu[0]->gs, gs2 = dn[0]->gs;
    if (I2 % 8 || !shape_ok(D, gs1) || !shape_ok(I, gs2)) return -1;
    for (int e = 0; e < A; e++)
        if (!moe_ok(gu[e], I2, D, gs1) || !moe_ok(dn[e], D, I, gs2)) return -1;
    const int G1 = D / gs1, G2 = I / gs2, T1 = I2 / 4, T2 = D / 4;
    int8_t *xq = aligned_alloc(64, ((size_t)D + 63) / 64 * 64);
    int8_t *hq = aligned_alloc(64, ((size_t)A * I + 63) / 64 * 64);
    float *h = malloc(sizeof(float) * (size_t)A * I2);
    float *dx = malloc(sizeof(float) * 2 * ((size_t)G1 + (size_t)A * G2));
    if (!xq || !hq || !h || !dx) {
        free(xq), free(hq), free(h), free(dx);
        return -2;
    }
    float *xs = dx + G1, *dh = xs + G1, *hs = dh + (size_t)A * G2;
    quantize_row(x, xdt, D, gs1, xq, dx, xs);
    if ((size_t)A * 3 * I * D / 2 < Q4_PARALLEL_BYTES) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int u = 0; u < A * T1; u++)
            tile4(gu[u / T1], u % T1, xq, dx, xs, h + (size_t)(u / T1) * I2 + 4 * (size_t)(u % T1));
#pragma omp for schedule(static)
        for (int e = 0; e < A; e++) {
            float *r = h + (size_t)e * I2;
            for (int j = 0; j < I; j++) {
                const float g = r[j];
                r[j] = g / (1.f + expf(-g)) * r[I + j];
            }
            quantize_row(r, Q4_F32, I, gs2, hq + (size_t)e * I, dh + (size_t)e * G2, hs + (size_t)e * G2);
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T2; t++) {
            float acc[4], r[4];
            for (int e = 0; e < A; e++) {
                tile4(dn[e], t, hq + (size_t)e * I, dh + (size_t)e * G2, hs + (size_t)e * G2, r);
                fold4(r, e, wt[e], xdt, each, y, D, t, acc);
            }
            if (!each)
                for (int j = 0; j < 4; j++) store_y(y, xdt, 4 * (size_t)t + j, acc[j]);
        }
    }
    free(xq), free(hq), free(h), free(dx);
    return 0;
}

/* ---- 16-bit weights (float16 or bfloat16), few rows: y [M, N] = x [M, K] @ W^T -----------------------------
 * torch's half GEMV on AVX2 streams ~0.6 of this CPU's RAM bandwidth (bench's "float16 GEMV" probe); this one
 * converts 8 weights at a time to fp32 (F16C, or a 16-bit shift for bf16) into FMAs, four rows a tile with the
 * tiles ahead prefetched, x converted to fp32 once. Each output is one row's fp32 dot product summed in a fixed
 * order (8 lanes, then the lanes), rounded once to xdt: the same for any thread count. */

static inline __m256 load8w(const uint16_t *w, int bf) {
    __m128i v = _mm_loadu_si128((const __m128i *)w);
    if (bf) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    return _mm256_cvtph_ps(v);
}

static inline float w1(uint16_t h, int bf) { return bf ? bf2f(h) : _cvtsh_ss(h); }

/* Four rows w0.. (row stride rb elements) · one fp32 row xr: the tile's four fp32 dot products (8 lanes of FMAs,
 * then the lanes, then the K mod 8 tail). h16_mm and h16_moe share it, so their outputs are the same bits. */
static inline __attribute__((always_inline)) void h16_tile4(const uint16_t *w0, size_t rb, int K, const float *xr,
                                                            int bf, int ahead, float *r) {
    const uint16_t *w1p = w0 + rb, *w2 = w1p + rb, *w3 = w2 + rb;
    const int K8 = K / 8 * 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K8; k += 8) {
        if (ahead && !(k & 31)) { /* a 64-byte line of each row, 8 rows ahead */
            _mm_prefetch((const char *)(w0 + 8 * rb + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1p + 8 * rb + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + 8 * rb + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(w3 + 8 * rb + k), _MM_HINT_T0);
        }
        const __m256 xv = _mm256_loadu_ps(xr + k);
        a0 = _mm256_fmadd_ps(load8w(w0 + k, bf), xv, a0);
        a1 = _mm256_fmadd_ps(load8w(w1p + k, bf), xv, a1);
        a2 = _mm256_fmadd_ps(load8w(w2 + k, bf), xv, a2);
        a3 = _mm256_fmadd_ps(load8w(w3 + k, bf), xv, a3);
    }
    r[0] = hsum(a0), r[1] = hsum(a1), r[2] = hsum(a2), r[3] = hsum(a3);
    for (int k = K8; k < K; k++) {
        r[0] += w1(w0[k], bf) * xr[k], r[1] += w1(w1p[k], bf) * xr[k];
        r[2] += w1(w2[k], bf) * xr[k], r[3] += w1(w3[k], bf) * xr[k];
    }
}

int h16_mm(const void *x, void *y, int xdt, int M, int N, int K, const uint16_t *w, int bf, int nthreads) {
    if (M < 1 || K < 1) return -1;
    float *xf = aligned_alloc(64, (sizeof(float) * (size_t)M * K + 63) / 64 * 64);
    if (!xf) return -2;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = load1(x, xdt, i);
    if ((size_t)N * K * 2 * (size_t)M < Q4_PARALLEL_BYTES) nthreads = 1;
    const int tiles = N / 4;
    const size_t rb = (size_t)K; /* elements per row */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int t = 0; t < tiles + (N % 4 ? 1 : 0); t++) {
        const int n0 = 4 * t, rows = N - n0 < 4 ? N - n0 : 4;
        for (int i = 0; i < M; i++) {
            const float *xr = xf + (size_t)i * K;
            float r[4];
            if (rows == 4) {
                h16_tile4(w + rb * n0, rb, K, xr, bf, i == 0, r);
            } else {
                for (int j = 0; j < rows; j++) {
                    const uint16_t *wr = w + rb * (n0 + j);
                    __m256 a = _mm256_setzero_ps();
                    for (int k = 0; k < K / 8 * 8; k += 8) a = _mm256_fmadd_ps(load8w(wr + k, bf), _mm256_loadu_ps(xr + k), a);
                    r[j] = hsum(a);
                    for (int k = K / 8 * 8; k < K; k++) r[j] += w1(wr[k], bf) * xr[k];
                }
            }
            for (int j = 0; j < rows; j++) store_y(y, xdt, (size_t)i * N + n0 + j, r[j]);
        }
    }
    free(xf);
    return 0;
}

/* ---- exact glue: RMSNorm and RoPE rounded as torch's eager ops round them (models/base.py: native_glue) ---------
 * A decode token runs 33 RMSNorms and 16 RoPEs at Qwen3-30B-A3B's widths, ~9 and ~6 torch ops each, ~70 and ~35 us
 * a call on this CPU for a few KB of work. These do the same arithmetic in one call. Every step is one IEEE fp32
 * operation rounded as torch rounds it (16-bit results of a 16-bit op: the fp32 result rounded to nearest even);
 * the one reduction, the mean of squares, sums in the order of torch's contiguous inner sum (SumKernel.cpp):
 * vectors of `lanes` floats, four interleaved accumulators each pushed up a four-level cascade every 16 vectors,
 * the leftover vectors into the first, the four summed in order, then the tail elements, then the lanes in order.
 * models/base.py compares each (dtype, width) with torch bit for bit before it uses them, and keeps torch's ops
 * where they differ. Contraction is off: an FMA would round once where torch rounds twice. */

static int ceil_log2(long x) { /* torch's utils::CeilLog2 */
    if (x <= 2) return 1;
    int b = 0;
    for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) b++;
    return b;
}

/* 8 fp32 values rounded to dt and back (round to nearest even; a NaN stays a NaN, as f2bf) */
static inline __m256i bf16_bits8(__m256 v) { /* the rounded bf16 in each lane's high half */
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    const __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    const __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_and_si256(_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan), isnan)),
                            _mm256_set1_epi32((int)0xffff0000u));
}

static inline __m256 rnd8(__m256 v, int dt) {
    if (dt == Q4_BF16) return _mm256_castsi256_ps(bf16_bits8(v));
    if (dt == Q4_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

static inline void store8(void *y, int dt, size_t i, __m256 v) {
    if (dt == Q4_F32) {
        _mm256_storeu_ps((float *)y + i, v);
    } else if (dt == Q4_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        const __m256i h = _mm256_srli_epi32(bf16_bits8(v), 16);
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
}

/* Σ x[i]² of one row (x of dtype dt) in torch's order for `lanes` = 8·H fp32 lanes (H 256-bit halves a vector) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static float torch_sumsq(const void *x, int dt, size_t o, int n, int H) {
    enum { LEVELS = 4, ILP = 4 };
    const int lanes = 8 * H;
    __m256 acc[LEVELS][ILP][2];
    for (int j = 0; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++) acc[j][k][0] = acc[j][k][1] = _mm256_setzero_ps();
    const long nv = n / lanes, rows = nv / ILP;
    int lp = ceil_log2(rows) / LEVELS;
    if (lp < 4) lp = 4;
    const long step = 1L << lp, mask = step - 1;
#define SQ(at) ({ const __m256 f_ = load8(x, dt, o + (size_t)(at)); _mm256_mul_ps(f_, f_); })
    long i = 0;
    for (; i + step <= rows;) {
        for (long j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int h = 0; h < H; h++) acc[0][k][h] = _mm256_add_ps(acc[0][k][h], SQ((i * ILP + k) * lanes + 8 * h));
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int h = 0; h < H; h++)
                    acc[j][k][h] = _mm256_add_ps(acc[j][k][h], acc[j - 1][k][h]), acc[j - 1][k][h] = _mm256_setzero_ps();
            if (i & (mask << (j * lp))) break;
        }
    }
    for (; i < rows; i++)
        for (int k = 0; k < ILP; k++)
            for (int h = 0; h < H; h++) acc[0][k][h] = _mm256_add_ps(acc[0][k][h], SQ((i * ILP + k) * lanes + 8 * h));
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int h = 0; h < H; h++) acc[0][k][h] = _mm256_add_ps(acc[0][k][h], acc[j][k][h]);
    for (long t = rows * ILP; t < nv; t++)
        for (int h = 0; h < H; h++) acc[0][0][h] = _mm256_add_ps(acc[0][0][h], SQ(t * lanes + 8 * h));
    for (int k = 1; k < ILP; k++)
        for (int h = 0; h < H; h++) acc[0][0][h] = _mm256_add_ps(acc[0][0][h], acc[0][k][h]);
#undef SQ
    float s = 0.0f, part[16];
    for (long t = nv * lanes; t < n; t++) {
        const float f = load1(x, dt, o + (size_t)t);
        s += f * f;
    }
    for (int h = 0; h < H; h++) _mm256_storeu_ps(part + 8 * h, acc[0][0][h]);
    for (int l = 0; l < lanes; l++) s += part[l];
    return s;
}

/* y [M, D] = w · rnd(x · rsqrt(Σx²/D + eps)), x, w, y of dtype dt (transformers' RMSNorm: statistics in fp32,
 * cast back, then the weight); lanes: the fp32 vector width of torch's sum here (8 or 16: models/base.py tries
 * both against torch). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int rms_norm(const void *x, void *y, int dt, int M, int D, const void *w, float eps, int lanes) {
    if (M < 1 || D < lanes || (lanes != 8 && lanes != 16)) return -1;
    const int D8 = D / 8 * 8;
    for (int m = 0; m < M; m++) {
        const size_t o = (size_t)m * D;
        const float r = 1.0f / sqrtf(torch_sumsq(x, dt, o, D, lanes / 8) / (float)D + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (int i = 0; i < D8; i += 8)
            store8(y, dt, o + i, _mm256_mul_ps(load8(w, dt, i), rnd8(_mm256_mul_ps(load8(x, dt, o + i), rv), dt)));
        for (int i = D8; i < D; i++) store_y(y, dt, o + i, load1(w, dt, i) * rnd(dt, load1(x, dt, o + i) * r));
    }
    return 0;
}

/* RoPE of R rows of Hd (row r at position r % T of cos/sin [T, Hd], all of dtype dt):
 * y = rnd(rnd(x·cos) + rnd(rot(x)·sin)), rot(x) = [−x2, x1] (base.apply_rope, op for op) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int rope(const void *x, void *y, int dt, int R, int T, int Hd, const void *cos, const void *sin) {
    if (R < 1 || T < 1 || Hd < 2 || Hd % 2) return -1;
    const int h = Hd / 2, h8 = h / 8 * 8;
    const __m256 neg = _mm256_set1_ps(-0.0f);
    for (int r = 0; r < R; r++) {
        const size_t o = (size_t)r * Hd, c = (size_t)(r % T) * Hd;
        for (int i = 0; i < h8; i += 8) {
            const __m256 x1 = load8(x, dt, o + i), x2 = load8(x, dt, o + h + i);
            const __m256 a1 = rnd8(_mm256_mul_ps(x1, load8(cos, dt, c + i)), dt);
            const __m256 b1 = rnd8(_mm256_mul_ps(_mm256_xor_ps(x2, neg), load8(sin, dt, c + i)), dt);
            const __m256 a2 = rnd8(_mm256_mul_ps(x2, load8(cos, dt, c + h + i)), dt);
            const __m256 b2 = rnd8(_mm256_mul_ps(x1, load8(sin, dt, c + h + i)), dt);
            store8(y, dt, o + i, _mm256_add_ps(a1, b1));
            store8(y, dt, o + h + i, _mm256_add_ps(a2, b2));
        }
        for (int i = h8; i < h; i++) {
            const float x1 = load1(x, dt, o + i), x2 = load1(x, dt, o + h + i);
            store_y(y, dt, o + i, rnd(dt, x1 * load1(cos, dt, c + i)) + rnd(dt, -x2 * load1(sin, dt, c + i)));
            store_y(y, dt, o + h + i, rnd(dt, x2 * load1(cos, dt, c + h + i)) + rnd(dt, x1 * load1(sin, dt, c + h + i)));
        }
    }
    return 0;
}

/* ---- one query's attention over a 16-bit KV cache (models/base.py: native_attend_one) -------------------------
 * q [H, Hd], k and v [K, ld] per kv head (key t at t·Hd; ld = the cache's capacity × Hd), S keys, y [H, Hd]: query
 * head h reads kv head h / (H/K). Scores, softmax and the weighted sum in fp32, rounded once to dt. The cache is
 * read as stored, 8 values a load: the torch path (attend_one) converts the whole cache to fp32 first, every
 * call, and runs ~10 small ops. Kv heads split over the threads. */

static inline __m256 exp8(__m256 x) { /* e^x, |rel err| < 2e-7: 2^n · p(r), r = x − n·ln2 in [−ln2/2, ln2/2] */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define ATT_MAX_HD 512

static inline __m256 hsum8(const __m256 *a) { /* lane j = the sum of a[j]'s 8 lanes */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* NB (1, 4 or 8) query heads h0.. of one kv head: scores [S][8] (head-minor: one vector a key), softmax, values.
 * dt and NB are constants at each call site, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void att_block(const float *qb, const uint16_t *kg, const uint16_t *vg,
                                                            void *y, int h0, int S, int Hd, float scale, float *sb,
                                                            const int dt, const int NB) {
    const int V8 = Hd / 8;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    const __m256 sv = _mm256_set1_ps(scale);
    for (int t = 0; t < S; t++) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int c = 0; c < V8; c++) {
            const __m256 kv = load8(kg, dt, (size_t)t * Hd + 8 * c);
            for (int j = 0; j < NB; j++) a[j] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qb + (size_t)j * Hd + 8 * c), a[j]);
        }
        const __m256 st = _mm256_mul_ps(hsum8(a), sv);
        _mm256_store_ps(sb + 8 * (size_t)t, st);
        mx = _mm256_max_ps(mx, st);
    }
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < S; t++) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sb + 8 * (size_t)t), mx));
        _mm256_store_ps(sb + 8 * (size_t)t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float inv[8];
    _mm256_storeu_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
    for (int c = 0; c < V8; c++) {
        __m256 a[8];
        for (int j = 0; j < NB; j++) a[j] = _mm256_setzero_ps();
        for (int t = 0; t < S; t++) {
            const __m256 vv = load8(vg, dt, (size_t)t * Hd + 8 * c);
            for (int j = 0; j < NB; j++) a[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(sb + 8 * (size_t)t + j), vv, a[j]);
        }
        for (int j = 0; j < NB; j++) store8(y, dt, (size_t)(h0 + j) * Hd + 8 * c, _mm256_mul_ps(a[j], _mm256_set1_ps(inv[j])));
    }
}

int attend1(const void *q, const void *k, const void *v, void *y, int dt, int H, int K, int S, int Hd, long ld,
            float scale, int nthreads) {
    if (K < 1 || H % K || Hd % 8 || Hd > ATT_MAX_HD || S < 1 || dt == Q4_F32) return -1;
    const int G = H / K, NB = G % 8 == 0 ? 8 : G % 4 == 0 ? 4 : 1, blocks = G / NB;
    float *qf = aligned_alloc(32, sizeof(float) * ((size_t)H * Hd + (size_t)nthreads * 8 * S + 8));
    if (!qf) return -2;
    for (size_t i = 0; i < (size_t)H * Hd; i++) qf[i] = load1(q, dt, i);
    if ((size_t)H * S * Hd < (1u << 16)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int u = 0; u < K * blocks; u++) {
        const int g = u / blocks, h0 = g * G + (u % blocks) * NB;
        const uint16_t *kg = (const uint16_t *)k + (size_t)g * ld, *vg = (const uint16_t *)v + (size_t)g * ld;
#ifdef _OPENMP
        float *sb = qf + (size_t)H * Hd + (size_t)omp_get_thread_num() * 8 * S;
#else
        float *sb = qf + (size_t)H * Hd;
#endif
        const float *qb = qf + (size_t)h0 * Hd;
        if (dt == Q4_BF16) {
            if (NB == 8) att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_BF16, 8);
            else if (NB == 4) att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_BF16, 4);
            else att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_BF16, 1);
        } else {
            if (NB == 8) att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_F16, 8);
            else if (NB == 4) att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_F16, 4);
            else att_block(qb, kg, vg, y, h0, S, Hd, scale, sb, Q4_F16, 1);
        }
    }
    free(qf);
    return 0;
}

/* ---- SiLU as torch computes it, and a token's 16-bit experts of a layer in one call ---------------------------
 * F.silu on CPU: x / (1 + exp(−x)) in fp32, exp from torch's Vectorized<float> (Sleef's expf, u10, FMA build) on
 * whole chunks of two vectors (2·lanes fp32 values; 4·lanes for a 16-bit tensor, two fp32 vectors each) and from
 * libm's expf on the tail, the result rounded to the tensor's dtype; lanes: the fp32 width of torch's activation
 * kernels here (8 AVX2, 16 AVX-512). Sleef's expf gives the same bits per lane at either width, so only the
 * chunks move. models/base.py finds lanes by checking this against torch bit for bit before anything uses it. */

static inline __m256 sleef_expf8(__m256 d) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681001892137f)));
    const __m256 qf = _mm256_cvtepi32_ps(q);
    __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
    s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
    __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
    u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
    u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
    const __m256i q1 = _mm256_srai_epi32(q, 1), q2 = _mm256_sub_epi32(q, q1); /* u · 2^q in two steps */
    u = _mm256_mul_ps(_mm256_mul_ps(u, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, _mm256_set1_epi32(127)), 23))),
                      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, _mm256_set1_epi32(127)), 23)));
    u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
    return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}

/* a[i] = rnd(silu(g[i])) for fp32 values g (those of a dt tensor): torch's chunks and tail for dtype dt */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void silu_torch(const float *g, float *a, int n, int dt, int lanes) {
    const int chunk = (dt == Q4_F32 ? 2 : 4) * lanes, whole = n / chunk * chunk;
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < whole; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        _mm256_storeu_ps(a + i, rnd8(_mm256_div_ps(v, _mm256_add_ps(one, sleef_expf8(_mm256_xor_ps(v, neg)))), dt));
    }
    for (int i = whole; i < n; i++) a[i] = rnd(dt, g[i] / (1.0f + expf(-g[i])));
}

int silu_rows(const void *x, void *y, int dt, int n, int lanes) { /* for the check against torch: y = F.silu(x) */
    if (lanes != 8 && lanes != 16) return -1;
    float *f = malloc(sizeof(float) * 2 * (size_t)(n > 0 ? n : 1));
    if (!f) return -2;
    for (int i = 0; i < n; i++) f[i] = load1(x, dt, i);
    silu_torch(f, f + n, n, dt, lanes);
    for (int i = 0; i < n; i++) store_y(y, dt, i, f[n + i]);
    free(f);
    return 0;
}

/* y [1, D] = Σ_e rnd(rnd(down_e(rnd(rnd(silu(g_e)) · u_e))) · wt[e]) in ascending e, each sum rounded to xdt, with
 * [g_e | u_e] = rnd(gate_up_e x): the numbers experts._dispatch_one gets from DenseExpert units one by one (each
 * GEMV h16_mm's, each elementwise op torch's), in one parallel region: the A gate_up products as one tile list,
 * the SiLU·up per expert, then down by tiles of D summing the experts in order. each=1: y [A, D], each expert's
 * weighted output. gate_up_e [2I, D], down_e [D, I], 16-bit (bf: bfloat16, else float16), rows contiguous; lanes:
 * silu_rows'. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int h16_moe(const void *x, void *y, int xdt, int A, const uint16_t *const *gu, const uint16_t *const *dn, int bf,
            int D, int I, const float *wt, int each, int lanes, int nthreads) {
    if (A < 1 || D < 4 || I < 2 || D % 4 || (2 * I) % 4 || (lanes != 8 && lanes != 16)) return -1;
    const int I2 = 2 * I, T1 = I2 / 4, T2 = D / 4;
    float *xf = aligned_alloc(64, sizeof(float) * (((size_t)D + (size_t)A * (I2 + I) + 15) / 16 * 16));
    if (!xf) return -2;
    float *h = xf + D, *m = h + (size_t)A * I2;
    for (int i = 0; i < D; i++) xf[i] = load1(x, xdt, i);
    if ((size_t)A * 3 * I * D * 2 < Q4_PARALLEL_BYTES) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int u = 0; u < A * T1; u++) {
            const int e = u / T1, t = u % T1;
            float r[4];
            h16_tile4(gu[e] + (size_t)D * 4 * t, (size_t)D, D, xf, bf, 1, r);
            for (int j = 0; j < 4; j++) h[(size_t)e * I2 + 4 * t + j] = rnd(xdt, r[j]);
        }
#pragma omp for schedule(static)
        for (int e = 0; e < A; e++) {
            const float *g = h + (size_t)e * I2, *up = g + I;
            float *me = m + (size_t)e * I;
            silu_torch(g, me, I, xdt, lanes);
            for (int j = 0; j < I; j++) {
                const float p = me[j] * up[j];
                me[j] = rnd(xdt, p);
            }
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T2; t++) {
            float acc[4], r[4];
            for (int e = 0; e < A; e++) {
                h16_tile4(dn[e] + (size_t)I * 4 * t, (size_t)I, I, m + (size_t)e * I, bf, 1, r);
                fold4(r, e, wt[e], xdt, each, y, D, t, acc);
            }
            if (!each)
                for (int j = 0; j < 4; j++) store_y(y, xdt, 4 * (size_t)t + j, acc[j]);
        }
    }
    free(xf);
    return 0;
}

/* ---- 4-bit rows back to 16-bit or fp32 weights (prefill: dequantise, then a dense GEMM) ------------------------
 * Rows r0 .. r0 + n of a q4_matrix's W (layouts r64, r64t, r64i) into out [n, K] of dtype odt:
 *   W[r, k] = q·s + m0,  m0 = m − 8·s   (a product, then a sum, each rounded in fp32 as hqq.affine_ does them),
 * rounded once to odt: kernels.PackedMatrix.dequantize's numbers, in one pass over the codes instead of five torch
 * ops per 64 rows. Rows split over nthreads. Returns 0; -1 for a shape or range it refuses. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int q4_dequant(const q4_matrix *m, int r0, int n, void *out, int odt, int nthreads) {
    const int K = m->K, gs = m->gs;
    if (!shape_ok(K, gs) || r0 < 0 || n < 0 || r0 + n > m->N || (m->il && (m->N % 4 || K % 64)) || m->sn != 2)
        return -1;
    const size_t rb = (size_t)K / 2, esz = odt == Q4_F32 ? 4 : 2;
    if ((size_t)n * rb < Q4_PARALLEL_BYTES) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int i = 0; i < n; i++) {
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        const int r = r0 + i, t = r / 4, j = r % 4;
        const uint8_t *w = m->il ? m->w + (size_t)t * 4 * rb + 32 * (size_t)j : m->w + (size_t)r * rb;
        const size_t cs = m->il ? 128 : 32; /* bytes from one 64-code chunk of the row to the next */
        const uint16_t *sz = m->sz + (size_t)t * m->st + 2 * (size_t)j;
        char *o = (char *)out + esz * (size_t)i * K;
        uint8_t q[64];
        for (int c = 0; c * 64 < K; c++) {
            const int span = K - 64 * c < 64 ? 32 : 64; /* a last chunk of 32 codes: byte b holds b and b + 16 */
            if (span == 64) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + cs * c));
                _mm256_storeu_si256((__m256i *)q, _mm256_and_si256(v, m4));
                _mm256_storeu_si256((__m256i *)(q + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            } else {
                const __m128i v = _mm_loadu_si128((const __m128i *)(w + cs * c)), m4h = _mm_set1_epi8(0x0f);
                _mm_storeu_si128((__m128i *)q, _mm_and_si128(v, m4h));
                _mm_storeu_si128((__m128i *)(q + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m4h));
            }
            for (int h = 0; h < span; h += 32) { /* 32 codes share a group (gs is 32 or a multiple of 64) */
                const long g = (64L * c + h) / gs;
                const float s = bf2f(sz[g * m->sg]), m0 = bf2f(sz[g * m->sg + 1]) - 8.f * s;
                const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m0);
                for (int e = h; e < h + 32; e += 8) {
                    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + e))));
                    store8(o, odt, 64 * (size_t)c + e, _mm256_add_ps(_mm256_mul_ps(f, vs), vm));
                }
            }
        }
    }
    return 0;
}
