/* C kernels for the CPU engine (kernels/cpu.py builds and calls them).
 *
 * Block-quantized GEMM: y[M, N] = x[M, K] @ W^T, W never expanded.
 *
 * W is stored the way GGUF's Q4_1 and Q8_0 store it, one row of W per output, in blocks
 * of 32 along K (kernels/cpu.py packs it):
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
 * unpacked once per four rows. Build: kernels/cpu.py compiles this at first use.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MINIINFER_SCALAR)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

#define ROWS 4 /* x rows per pass over a row of W */

int miniinfer_cpu_simd(void) { return HAVE_AVX2; }

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

/* ---- the decoder layer's element-wise math, fp32, one call each (the torch chains they
 * replace cost 40-140 us a call in dispatch on a 2-core machine at decode sizes) ---- */

/* out = w * (r * (1 / sqrt(mean(r*r) + eps))) per row of N, r = x, or x + res (then also
 * written to res_out): the rounding steps of engine.layers.LayerOps.rmsnorm, but for the
 * order of the sum of squares. */
void miniinfer_rmsnorm(const float *x, const float *res, float *res_out, const float *w, float *out,
                       int64_t T, int64_t N, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T >= 8)
    for (int64_t t = 0; t < T; t++) {
        const float *r = x + t * N;
        if (res != 0) {
            float *ro = res_out + t * N;
            for (int64_t i = 0; i < N; i++) ro[i] = r[i] + res[t * N + i];
            r = ro;
        }
        float part[8] = {0};
        for (int64_t i = 0; i < N; i++) part[i & 7] += r[i] * r[i];
        float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        const float inv = 1.0f / sqrtf(ss / (float)N + eps);
        float *o = out + t * N;
        for (int64_t i = 0; i < N; i++) o[i] = w[i] * (r[i] * inv);
    }
}

/* neox rotary in place: per head of D (contiguous), first half a*c - b*s, second b*c + a*s,
 * with cos/sin rows [P, D] picked by pos[t]; as LayerOps.rotary, bit for bit. x: T rows
 * of H heads, row stride st (elements). */
static void rotate(float *x, int64_t T, int64_t H, int64_t st, int64_t D, const float *cos,
                   const float *sin, const int64_t *pos) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + pos[t] * D, *s = sin + pos[t] * D;
        for (int64_t h = 0; h < H; h++) {
            float *v = x + t * st + h * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + (-b) * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

void miniinfer_rotary(float *q, int64_t q_stride, int64_t H, float *k, int64_t k_stride,
                      int64_t Hkv, int64_t T, int64_t D, const float *cos, const float *sin,
                      const int64_t *pos) {
    rotate(q, T, H, q_stride, D, cos, sin, pos);
    rotate(k, T, Hkv, k_stride, D, cos, sin, pos);
}

/* out[t, i] = silu(x[t, i]) * x[t, I + i], silu(a) = a / (1 + exp(-a)) */
void miniinfer_silu_mul(const float *x, float *out, int64_t T, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * I >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i++) o[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
    }
}

/* ---- decode attention over the paged KV cache (one query token per sequence) ---- */

/* sum_i a[i] * b[i] and y += s * x over n floats (n % 8 == 0 takes the vector path) */
static inline float dot(const float *a, const float *b, int64_t n) {
#if HAVE_AVX2
    if (n % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        return hsum(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float s, const float *x, float *y, int64_t n) {
#if HAVE_AVX2
    if (n % 8 == 0) {
        const __m256 vs = _mm256_set1_ps(s);
        for (int64_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vs, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) y[i] += s * x[i];
}

/* A K or V row as fp32: the row itself, or int8 * scale (engine.kv_cache.dequantize_int8's
 * rounding) written to buf. */
static inline const float *kv_row(const void *data, const float *scales, int quantized, int64_t row,
                                  int64_t D, float *buf) {
    if (!quantized) return (const float *)data + row * D;
    const int8_t *r = (const int8_t *)data + row * D;
    const float s = scales[row];
    for (int64_t i = 0; i < D; i++) buf[i] = (float)r[i] * s;
    return buf;
}

/* q [B, H, D] -> out [B, H, D]. data: one layer of the cache, [2, P, 16, Hkv, D] fp32 or
 * int8 (then scales [2, P, 16, Hkv]); tables [B, maxp] page ids; ctx [B] tokens (>= 1).
 * One (sequence, kv head) at a time, all of its GQA group's query heads together, so each
 * K/V row is read once. scores = (q . k) * scale; softmax(scores) = exp(s - max) / sum;
 * out = sum_t p_t v_t. scratch: B * H * max_ctx floats. */
void miniinfer_decode_attention(const float *q, const void *data, const float *scales, int quantized,
                                const int64_t *tables, int64_t maxp, const int64_t *ctx, int64_t B,
                                int64_t H, int64_t Hkv, int64_t D, int64_t P, float scale,
                                float *scratch, int64_t max_ctx, float *out, int threads) {
    const int64_t G = H / Hkv, S = 16;
    const int64_t half = P * S * Hkv; /* rows in K; V's rows follow */
    const int64_t esize = quantized ? 1 : 4;
    const char *vdata = (const char *)data + half * D * esize;
    const float *vscales = quantized ? scales + half : 0;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (B * Hkv >= 4)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kh = 0; kh < Hkv; kh++) {
            float buf[1024]; /* a dequantized row; D <= 1024 (checked by the caller) */
            const int64_t L = ctx[b];
            const int64_t *tab = tables + b * maxp;
            const float *qg = q + (b * H + kh * G) * D;
            float *sc = scratch + (b * H + kh * G) * max_ctx;
            if (L <= 0) { /* the caller rules this out; zeros rather than a read past the end */
                for (int64_t i = 0; i < G * D; i++) out[(b * H + kh * G) * D + i] = 0.0f;
                continue;
            }
            for (int64_t t = 0; t < L; t++) {
                const int64_t row = (tab[t / S] * S + t % S) * Hkv + kh;
                const float *k = kv_row(data, scales, quantized, row, D, buf);
                for (int64_t g = 0; g < G; g++) sc[g * max_ctx + t] = dot(qg + g * D, k, D) * scale;
            }
            for (int64_t g = 0; g < G; g++) {
                float *s = sc + g * max_ctx, m = s[0], sum = 0.0f;
                for (int64_t t = 1; t < L; t++) m = s[t] > m ? s[t] : m;
                for (int64_t t = 0; t < L; t++) sum += (s[t] = expf(s[t] - m));
                for (int64_t t = 0; t < L; t++) s[t] /= sum;
                float *o = out + (b * H + kh * G + g) * D;
                for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
            }
            for (int64_t t = 0; t < L; t++) {
                const int64_t row = (tab[t / S] * S + t % S) * Hkv + kh;
                const float *v = kv_row(vdata, vscales, quantized, row, D, buf);
                for (int64_t g = 0; g < G; g++) axpy(sc[g * max_ctx + t], v, out + (b * H + kh * G + g) * D, D);
            }
        }
    }
}
