/* Block-quantized GEMM for the CPU engine: y[M, N] = x[M, K] @ W^T, W never expanded.
 *
 * W is stored the way GGUF's Q4_1 and Q8_0 store it, one row of W per output, in blocks
 * of 32 along K (kernels/cpu_quant.py packs it):
 *   q4_1: qs uint8 [N, K/2]: block b of a row is 16 bytes; byte i holds element 32b+i in
 *         its low nibble and element 32b+16+i in its high nibble; d, m fp32 [N, K/32];
 *         w = d*q + m.
 *   q8_0: qs int8 [N, K]; d fp32 [N, K/32]; w = d*q.
 * Every weight is rebuilt as (d*q) + m in fp32, a rounded multiply then a rounded add
 * (never a fused multiply-add; build with -ffp-contract=off), which is how gguf's
 * dequantizer computes it: the weights are bit for bit the fp32 ones, only the order of
 * the dot product's sums differs from a dense matmul.
 *
 * Threads split the N outputs (OpenMP; the process's libgomp is torch's, already loaded,
 * so both share one thread pool). x rows go four at a time, so each block of W is
 * unpacked once per four rows. Build: kernels/cpu_quant.py compiles this at first use.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MINIINFER_SCALAR)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

#define ROWS 4 /* x rows per pass over a row of W */

int miniinfer_cpu_quant_simd(void) { return HAVE_AVX2; }

#if HAVE_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 unsigned bytes (the low half of b) -> 8 floats */
static inline __m256 u8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline __m256 i8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

/* acc[2r], acc[2r+1] += one block (32 weights, as four vectors) times row r of x: two
 * chains a row, since one chain is bound by the FMA's latency rather than its throughput */
static inline void block_fma(__m256 *acc, const float *x, int64_t rows, int64_t K, __m256 w0,
                             __m256 w1, __m256 w2, __m256 w3) {
    for (int r = 0; r < rows; r++) {
        const float *xb = x + r * K;
        acc[2 * r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[2 * r + 1]);
        acc[2 * r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[2 * r + 1]);
    }
}

static inline void sum_rows(const __m256 *acc, int64_t rows, float *y, int64_t ldy) {
    for (int r = 0; r < rows; r++) y[r * ldy] = hsum(_mm256_add_ps(acc[2 * r], acc[2 * r + 1]));
}

static void q4_1_row(const float *x, int64_t rows, int64_t K, const uint8_t *q, const float *d,
                     const float *m, float *y, int64_t ldy) {
    const int64_t nb = K / 32;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[2 * ROWS];
    for (int r = 0; r < 2 * rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + 16 * b));
        const __m128i lo = _mm_and_si128(bytes, low);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        const __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);
        const __m256 w0 = _mm256_add_ps(_mm256_mul_ps(vd, u8x8(lo)), vm);
        const __m256 w1 = _mm256_add_ps(_mm256_mul_ps(vd, u8x8(_mm_srli_si128(lo, 8))), vm);
        const __m256 w2 = _mm256_add_ps(_mm256_mul_ps(vd, u8x8(hi)), vm);
        const __m256 w3 = _mm256_add_ps(_mm256_mul_ps(vd, u8x8(_mm_srli_si128(hi, 8))), vm);
        block_fma(acc, x + 32 * b, rows, K, w0, w1, w2, w3);
    }
    sum_rows(acc, rows, y, ldy);
}

static void q8_0_row(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *d,
                     float *y, int64_t ldy) {
    const int64_t nb = K / 32;
    __m256 acc[2 * ROWS];
    for (int r = 0; r < 2 * rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m128i b0 = _mm_loadu_si128((const __m128i *)(q + 32 * b));
        const __m128i b1 = _mm_loadu_si128((const __m128i *)(q + 32 * b + 16));
        const __m256 vd = _mm256_set1_ps(d[b]);
        const __m256 w0 = _mm256_mul_ps(vd, i8x8(b0));
        const __m256 w1 = _mm256_mul_ps(vd, i8x8(_mm_srli_si128(b0, 8)));
        const __m256 w2 = _mm256_mul_ps(vd, i8x8(b1));
        const __m256 w3 = _mm256_mul_ps(vd, i8x8(_mm_srli_si128(b1, 8)));
        block_fma(acc, x + 32 * b, rows, K, w0, w1, w2, w3);
    }
    sum_rows(acc, rows, y, ldy);
}
#else
static void q4_1_row(const float *x, int64_t rows, int64_t K, const uint8_t *q, const float *d,
                     const float *m, float *y, int64_t ldy) {
    float acc[ROWS] = {0};
    for (int64_t b = 0; b < K / 32; b++) {
        for (int i = 0; i < 32; i++) {
            const int nib = i < 16 ? (q[16 * b + i] & 0x0F) : (q[16 * b + i - 16] >> 4);
            const float prod = d[b] * (float)nib;
            const float w = prod + m[b];
            for (int r = 0; r < rows; r++) acc[r] += w * x[r * K + 32 * b + i];
        }
    }
    for (int r = 0; r < rows; r++) y[r * ldy] = acc[r];
}

static void q8_0_row(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *d,
                     float *y, int64_t ldy) {
    float acc[ROWS] = {0};
    for (int64_t b = 0; b < K / 32; b++) {
        for (int i = 0; i < 32; i++) {
            const float w = d[b] * (float)q[32 * b + i];
            for (int r = 0; r < rows; r++) acc[r] += w * x[r * K + 32 * b + i];
        }
    }
    for (int r = 0; r < rows; r++) y[r * ldy] = acc[r];
}
#endif

/* Both entry points: x [M, K] fp32 contiguous, y [M, N] fp32 contiguous, K % 32 == 0. */
void miniinfer_q4_1_gemm(const float *x, int64_t M, int64_t K, const uint8_t *qs, const float *d,
                         const float *m, int64_t N, float *y, int threads) {
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < N; j++) {
        for (int64_t r = 0; r < M; r += ROWS) {
            const int64_t rows = M - r < ROWS ? M - r : ROWS;
            q4_1_row(x + r * K, rows, K, qs + j * nb * 16, d + j * nb, m + j * nb, y + r * N + j, N);
        }
    }
}

void miniinfer_q8_0_gemm(const float *x, int64_t M, int64_t K, const int8_t *qs, const float *d,
                         int64_t N, float *y, int threads) {
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < N; j++) {
        for (int64_t r = 0; r < M; r += ROWS) {
            const int64_t rows = M - r < ROWS ? M - r : ROWS;
            q8_0_row(x + r * K, rows, K, qs + j * nb * 32, d + j * nb, y + r * N + j, N);
        }
    }
}
