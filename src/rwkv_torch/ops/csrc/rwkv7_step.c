/* One token through every RWKV-7 block in one call (rwkv_torch.decode.c_step drives it), fp32, eval semantics.
 *
 * The math of layers/rwkv7.py's TimeMix and ChannelMix at T = 1 over decode.weights.RWKV7LayerWeights (the
 * stacked, zero-padded LoRAs with the gate rewritten as tanh(u/2) @ (g2/2) + sum(g2/2)). Embedding, ln0, ln_out and
 * the head stay in PyTorch. One OpenMP team runs the whole step: the large matrix-vector products are split by
 * output rows, the LoRAs one per thread, the WKV state update one (batch, head) pair per work item, and the small
 * elementwise passes on one thread; every weight is read once per token for the whole batch.
 *
 * Per layer, params[l * NP + P_*] (contiguous, layouts of RWKV7LayerWeights):
 *   ln1/ln2 weight and bias [C]; mus [6, C] (order r, k, v, a, w, g); lora first [n, C, D], second [n, D, C],
 *   bias [n, C] (order (v,) a, w, g: n = 4, or 3 in layer 0); 1 - k_a, k_a, k_k, r_k [C]; W_r, W_k, W_v, W_o [C, C]
 *   (out x in); ln_x weight and bias [C]; ffn x_k [C], key [F, C], value [C, F]; then the per-row scales of the six
 *   matrices ([out] each, read only for int8). Everything is float32 except the six matrices, which are in the
 *   weight format wfmt: 0 float32, 1 bfloat16 (raw uint16), 2 int8 (row o of the matrix is q[o, :] * scale[o]).
 * Activations, sums and the state are float32 in every format. The library is compiled on first use with
 * -march=native on the CPU that runs it (ops/cpu_lib.py), so the ISA is the running CPU's: AVX2+FMA gets
 * hand-written widening dot products for int8/bf16, anything else the portable loops.
 * State per layer: shift_att [B, C], shift_ffn [B, C], wkv [B, H, N, N] (official layout S[i][j], i = value index);
 * read from *_in, written to *_out (the same pointers for an in-place step).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The pointer table's order: the tensor fields of rwkv_torch.decode.weights.RWKV7LayerWeights, which checks this list
 * (rwkv7_step_fields) against its own when the library is first used. */
enum { P_LN1W, P_LN1B, P_LN2W, P_LN2B, P_MUS, P_FIRST, P_SECOND, P_BIAS, P_OMKA, P_KA, P_KK, P_RK,
       P_WR, P_WK, P_WV, P_WO, P_LNXW, P_LNXB, P_FXK, P_FKEY, P_FVAL,
       P_SR, P_SK, P_SV, P_SO, P_SFKEY, P_SFVAL, NP };

const char *rwkv7_step_fields(void) {
    return "ln1_w,ln1_b,ln2_w,ln2_b,mus,lora_first,lora_second,lora_bias,one_minus_k_a,k_a,k_k,r_k,"
           "w_r,w_k,w_v,w_o,ln_x_w,ln_x_b,ffn_x_k,ffn_key,ffn_value,"
           "s_r,s_k,s_v,s_o,s_ffn_key,s_ffn_value";
}

#define DECAY_SCALE 0.60653065971263342f /* exp(-0.5) */

/* e^x, branch-free so that loops calling it vectorise (libm's expf does not without -ffast-math): 2^n e^r with
 * n = rint(x log2 e), r = x - n ln 2 (Cody-Waite, two parts), e^r by its Taylor series to r^7 (|r| <= ln2 / 2: error
 * below 6e-9 relative, under one float ulp). x is clamped to [-87, 88] (2^n stays a normal float); NaN propagates. */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + exp_f(-x)); }

/* mean and biased variance, accumulated in double */
static void moments(const float *x, int64_t n, double *mean, double *var) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    const double m = s / (double)n;
    for (int64_t i = 0; i < n; i++) ss += ((double)x[i] - m) * ((double)x[i] - m);
    *mean = m;
    *var = ss / (double)n;
}

static void norm_affine(const float *x, float *y, const float *w, const float *b, int64_t n, double eps) {
    double m, v;
    moments(x, n, &m, &v);
    const float mf = (float)m, inv = (float)(1.0 / sqrt(v + eps));
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mf) * inv * w[i] + b[i];
}

static inline float load_f32(float w) { return w; }
static inline float load_bf16(uint16_t w) {
    const uint32_t u = (uint32_t)w << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float load_i8(int8_t w) { return (float)w; }

/* DOT4(W, in, x, n, s): s[j] = sum_i widen(W[j * in + i]) x[i] for four consecutive rows j = 0..3; portable loops
 * (four independent sums the compiler vectorises), replaced below by AVX2 code for the narrow formats. */
#define PORTABLE_DOT4(NAME, T, LOAD)                                                                               \
    static void NAME(const T *restrict W, int64_t in, const float *restrict x, int64_t n, float *restrict s) {     \
        const T *w0 = W, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;                                             \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                                      \
        for (int64_t i = 0; i < n; i++) {                                                                          \
            const float xi = x[i];                                                                                 \
            s0 += LOAD(w0[i]) * xi;                                                                                \
            s1 += LOAD(w1[i]) * xi;                                                                                \
            s2 += LOAD(w2[i]) * xi;                                                                                \
            s3 += LOAD(w3[i]) * xi;                                                                                \
        }                                                                                                          \
        s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;                                                                \
    }

PORTABLE_DOT4(dot4_f32, float, load_f32)

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* 8 int8 weights -> 8 floats: one sign-extending load, one conversion */
static inline __m256 widen8_i8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

/* 8 bf16 weights -> 8 floats: zero-extend to 32 bits and shift into the high half */
static inline __m256 widen8_bf16(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}

/* Two sums per row, 16 weights per row per iteration: eight independent FMA chains hide the FMA latency. */
#define AVX2_DOT4(NAME, T, WIDEN, LOAD)                                                                            \
    static void NAME(const T *restrict W, int64_t in, const float *restrict x, int64_t n, float *restrict s) {     \
        __m256 a[8];                                                                                               \
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                                                    \
        int64_t i = 0;                                                                                             \
        for (; i + 16 <= n; i += 16) {                                                                             \
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);                             \
            for (int j = 0; j < 4; j++) {                                                                          \
                const T *w = W + j * in + i;                                                                       \
                a[2 * j] = _mm256_fmadd_ps(WIDEN(w), x0, a[2 * j]);                                                \
                a[2 * j + 1] = _mm256_fmadd_ps(WIDEN(w + 8), x1, a[2 * j + 1]);                                    \
            }                                                                                                      \
        }                                                                                                          \
        for (int j = 0; j < 4; j++) {                                                                              \
            float t = hsum8(_mm256_add_ps(a[2 * j], a[2 * j + 1]));                                                \
            for (int64_t k = i; k < n; k++) t += LOAD(W[j * in + k]) * x[k];                                       \
            s[j] = t;                                                                                              \
        }                                                                                                          \
    }

AVX2_DOT4(dot4_i8, int8_t, widen8_i8, load_i8)
AVX2_DOT4(dot4_bf16, uint16_t, widen8_bf16, load_bf16)
#else
PORTABLE_DOT4(dot4_i8, int8_t, load_i8)
PORTABLE_DOT4(dot4_bf16, uint16_t, load_bf16)
#endif

/* Y[b, o] = (acc ? Y[b, o] : 0) + scale[o] * sum_i W[o, i] X[b, i] for the rows o of this thread's share (scale
 * NULL: 1). Four rows at a time (DOT4), the batch inside, so each weight row is read once for all rows of X (the
 * four rows stay in L1 across the batch). One copy per weight format. */
#define GEMV_ROWS(NAME, T, LOAD, DOT4)                                                                             \
    static void NAME(const T *restrict W, const float *restrict scale, const float *restrict X, float *restrict Y, \
                     int64_t B, int64_t out, int64_t in, int acc) {                                                \
        _Pragma("omp for schedule(static)")                                                                        \
        for (int64_t o4 = 0; o4 < (out + 3) / 4; o4++) {                                                           \
            const int64_t o = o4 * 4, m = out - o < 4 ? out - o : 4;                                               \
            for (int64_t b = 0; b < B; b++) {                                                                      \
                const float *xb = X + b * in;                                                                      \
                float *yb = Y + b * out + o;                                                                       \
                float sums[4] = {0, 0, 0, 0};                                                                      \
                if (m == 4) {                                                                                      \
                    DOT4(W + o * in, in, xb, in, sums);                                                            \
                } else {                                                                                           \
                    for (int64_t j = 0; j < m; j++) {                                                              \
                        const T *wj = W + (o + j) * in;                                                            \
                        float sj = 0;                                                                              \
                        for (int64_t i = 0; i < in; i++) sj += LOAD(wj[i]) * xb[i];                                \
                        sums[j] = sj;                                                                              \
                    }                                                                                              \
                }                                                                                                  \
                for (int64_t j = 0; j < m; j++) {                                                                  \
                    const float v = scale ? sums[j] * scale[o + j] : sums[j];                                      \
                    yb[j] = acc ? yb[j] + v : v;                                                                   \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

GEMV_ROWS(gemv_f32, float, load_f32, dot4_f32)
GEMV_ROWS(gemv_bf16, uint16_t, load_bf16, dot4_bf16)
GEMV_ROWS(gemv_i8, int8_t, load_i8, dot4_i8)

enum { WF_F32 = 0, WF_BF16 = 1, WF_I8 = 2 };

/* gemv_* for the weight format wfmt; call inside a parallel region (the rows are shared out by an omp for). */
static void gemv_rows(int wfmt, const void *W, const float *scale, const float *X, float *Y, int64_t B, int64_t out,
                      int64_t in, int acc) {
    if (wfmt == WF_I8) gemv_i8((const int8_t *)W, scale, X, Y, B, out, in, acc);
    else if (wfmt == WF_BF16) gemv_bf16((const uint16_t *)W, 0, X, Y, B, out, in, acc);
    else gemv_f32((const float *)W, 0, X, Y, B, out, in, acc);
}

/* Y [B, out] = X [B, in] @ W^T (W in the weight format wfmt, [out, in]; int8 rows times scale) + bias (or NULL):
 * the one-token (few-row) linear layer of rwkv_torch.quantize.QuantLinear, e.g. the LM head. Returns 0. */
int rwkv_qgemv(int wfmt, const void *W, const float *scale, const float *bias, const float *X, float *Y, int64_t B,
               int64_t out, int64_t in, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        gemv_rows(wfmt, W, scale, X, Y, B, out, in, 0);
        if (bias) {
#pragma omp for schedule(static)
            for (int64_t o = 0; o < out; o++)
                for (int64_t b = 0; b < B; b++) Y[b * out + o] += bias[o];
        }
    }
    return 0;
}

/* Z[b, :D] = X[b] @ A ([C, D], rows axpy'd) */
static void lora_first(const float *restrict A, const float *restrict X, float *restrict Z, int64_t B, int64_t C,
                       int64_t D) {
    for (int64_t b = 0; b < B; b++) {
        float *z = Z + b * D;
        const float *x = X + b * C;
        for (int64_t d = 0; d < D; d++) z[d] = 0;
        for (int64_t c = 0; c < C; c++) {
            const float xc = x[c], *a = A + c * D;
            for (int64_t d = 0; d < D; d++) z[d] += xc * a[d];
        }
    }
}

/* Y[b, :C] = bias + Z[b] @ A2 ([D, C]) */
static void lora_second(const float *restrict A2, const float *restrict bias, const float *restrict Z,
                        float *restrict Y, int64_t B, int64_t C, int64_t D) {
    for (int64_t b = 0; b < B; b++) {
        float *y = Y + b * C;
        const float *z = Z + b * D;
        memcpy(y, bias, sizeof(float) * C);
        for (int64_t d = 0; d < D; d++) {
            const float zd = z[d], *a = A2 + d * C;
            for (int64_t c = 0; c < C; c++) y[c] += zd * a[c];
        }
    }
}

/* One head's state update and read-out: sa = S kk; S = S diag(decay) - sa bᵀ + v kᵀ; y = S r. Inlined into
 * wkv_head below twice: once for N = 64 (the usual head size: the row loops unroll and r, decay, k, kk and b stay in
 * registers across the rows), once for any N. */
static inline void wkv_head_n(const float *Sin, float *S, const float *restrict r, const float *restrict dec,
                              const float *restrict k, const float *restrict v, const float *restrict kk,
                              const float *restrict bv, float *restrict y, int64_t N) {
    if (Sin != S) memcpy(S, Sin, sizeof(float) * N * N);
    for (int64_t i = 0; i < N; i++) {
        float *row = S + i * N;
        float sa = 0, yi = 0;
        for (int64_t j = 0; j < N; j++) sa += row[j] * kk[j];
        const float vi = v[i];
        for (int64_t j = 0; j < N; j++) {
            const float s = row[j] * dec[j] - sa * bv[j] + vi * k[j];
            row[j] = s;
            yi += s * r[j];
        }
        y[i] = yi;
    }
}

static void wkv_head(const float *Sin, float *S, const float *restrict r, const float *restrict dec,
                     const float *restrict k, const float *restrict v, const float *restrict kk,
                     const float *restrict bv, float *restrict y, int64_t N) {
    if (N == 64) wkv_head_n(Sin, S, r, dec, k, v, kk, bv, y, 64);
    else wkv_head_n(Sin, S, r, dec, k, v, kk, bv, y, N);
}

typedef struct {
    float *xa, *xs, *r, *k, *v, *z, *lo, *y, *vfirst, *xf, *kf, *kk, *bv, *dec;
} scratch_t;

int rwkv7_blocks_step(int64_t L, int64_t B, int64_t C, int64_t H, int64_t F, int64_t D, const void *const *params,
                      const int64_t *n_lora, const double *eps, int wfmt, float *x, float *const *sa_in, float *const *sf_in,
                      float *const *wkv_in, float *const *sa_out, float *const *sf_out, float *const *wkv_out,
                      int threads) {
    const int64_t N = C / H, BC = B * C;
    float *buf = (float *)malloc(sizeof(float) * (BC * 22 + B * 4 * D + B * F));
    if (!buf) return 1;
    scratch_t s;
    s.xa = buf;
    s.xs = s.xa + BC;      /* [6, B, C] */
    s.r = s.xs + 6 * BC;
    s.k = s.r + BC;
    s.v = s.k + BC;
    s.lo = s.v + BC;       /* [4, B, C] */
    s.y = s.lo + 4 * BC;
    s.vfirst = s.y + BC;
    s.xf = s.vfirst + BC;
    s.kk = s.xf + BC;
    s.bv = s.kk + BC;
    s.dec = s.bv + BC;
    s.z = s.dec + BC;      /* [4, B, D] */
    s.kf = s.z + 4 * B * D; /* [B, F] */
    if (threads < 1) threads = 1;

#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < L; l++) {
        const float *const *P = (const float *const *)params + l * NP;
        const void *const *Q = params + l * NP; /* the matrices, in format wfmt */
        const int64_t n = n_lora[l];
        const double eps1 = eps[3 * l], eps2 = eps[3 * l + 1], epsx = eps[3 * l + 2];

        /* ln1, the six token-shift mixes, and the new shift_att */
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            float *xa = s.xa + b * C;
            const float *prev = sa_in[l] + b * C;
            norm_affine(x + b * C, xa, P[P_LN1W], P[P_LN1B], C, eps1);
            for (int m = 0; m < 6; m++) {
                const float *mu = P[P_MUS] + m * C;
                float *o = s.xs + m * BC + b * C;
                for (int64_t c = 0; c < C; c++) o[c] = xa[c] + (prev[c] - xa[c]) * mu[c];
            }
        }
        /* r, k, v: one share of the rows of all three per thread */
        gemv_rows(wfmt, Q[P_WR], P[P_SR], s.xs, s.r, B, C, C, 0);
        gemv_rows(wfmt, Q[P_WK], P[P_SK], s.xs + BC, s.k, B, C, C, 0);
        gemv_rows(wfmt, Q[P_WV], P[P_SV], s.xs + 2 * BC, s.v, B, C, C, 0);
        /* the LoRAs, one per thread: mix 6 - n + i feeds LoRA i */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; i++) {
            float *z = s.z + i * B * D, *lo = s.lo + i * BC;
            lora_first(P[P_FIRST] + i * C * D, s.xs + (6 - n + i) * BC, z, B, C, D);
            if (i >= n - 2)
                for (int64_t j = 0; j < B * D; j++) z[j] = tanhf(z[j]);
            lora_second(P[P_SECOND] + i * D * C, P[P_BIAS] + i * C, z, lo, B, C, D);
        }
        /* gates, value residual, kk, k, b */
#pragma omp single
        {
            float *lv = n == 4 ? s.lo : 0, *la = s.lo + (n - 3) * BC, *lw = la + BC;
            for (int64_t j = 0; j < BC; j++) {
                const int64_t c = j % C;
                s.dec[j] = exp_f(-DECAY_SCALE * sigmoidf_(lw[j]));
                const float a = sigmoidf_(la[j]);
                if (lv) s.v[j] += (s.vfirst[j] - s.v[j]) * sigmoidf_(lv[j]);
                s.kk[j] = s.k[j] * P[P_KK][c];
                s.k[j] *= P[P_OMKA][c] + a * P[P_KA][c];
                la[j] = a;
            }
            if (l == 0) memcpy(s.vfirst, s.v, sizeof(float) * BC);
            for (int64_t bh = 0; bh < B * H; bh++) {
                float *kk = s.kk + bh * N;
                double ss = 0;
                for (int64_t j = 0; j < N; j++) ss += (double)kk[j] * kk[j];
                double nrm = sqrt(ss);
                const float inv = (float)(1.0 / (nrm > 1e-12 ? nrm : 1e-12));
                for (int64_t j = 0; j < N; j++) {
                    kk[j] *= inv;
                    s.bv[bh * N + j] = kk[j] * la[bh * N + j];
                }
            }
        }
        /* WKV, one (batch, head) pair per item */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t o = bh * N;
            wkv_head(wkv_in[l] + bh * N * N, wkv_out[l] + bh * N * N, s.r + o, s.dec + o, s.k + o, s.v + o, s.kk + o,
                     s.bv + o, s.y + o, N);
        }
        /* group norm, bonus, gate */
#pragma omp single
        {
            const float *g = s.lo + (n - 1) * BC;
            for (int64_t bh = 0; bh < B * H; bh++) {
                const int64_t o = bh * N, c0 = (bh % H) * N;
                float *y = s.y + o;
                norm_affine(y, y, P[P_LNXW] + c0, P[P_LNXB] + c0, N, epsx);
                float bonus = 0;
                for (int64_t j = 0; j < N; j++) bonus += s.r[o + j] * s.k[o + j] * P[P_RK][c0 + j];
                for (int64_t j = 0; j < N; j++) y[j] = (y[j] + bonus * s.v[o + j]) * g[o + j];
            }
        }
        gemv_rows(wfmt, Q[P_WO], P[P_SO], s.y, x, B, C, C, 1);
        /* ln2 and the ffn's token-shift mix (kept in s.xs), and the new shifts */
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            float *xf = s.xf + b * C, *o = s.xs + b * C;
            const float *prev = sf_in[l] + b * C, *mu = P[P_FXK];
            norm_affine(x + b * C, xf, P[P_LN2W], P[P_LN2B], C, eps2);
            for (int64_t c = 0; c < C; c++) o[c] = xf[c] + (prev[c] - xf[c]) * mu[c];
            memcpy(sf_out[l] + b * C, xf, sizeof(float) * C);
            memcpy(sa_out[l] + b * C, s.xa + b * C, sizeof(float) * C);
        }
        gemv_rows(wfmt, Q[P_FKEY], P[P_SFKEY], s.xs, s.kf, B, F, C, 0);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < B * F; j++) {
            const float t = s.kf[j] > 0 ? s.kf[j] : 0;
            s.kf[j] = t * t;
        }
        gemv_rows(wfmt, Q[P_FVAL], P[P_SFVAL], s.kf, x, B, C, F, 1);
    }
    free(buf);
    return 0;
}

/* ---- The batched step's pieces (rwkv_torch.decode.batched): the same math as rwkv7_blocks_step for B independent
 * rows, with the projections and LoRAs left to the caller's matrix-matrix products. params and l address layer l's
 * pointer table as above. Rows are shared out across the threads; every piece may run in place on the state
 * (*_in == *_out). */

/* ln1(x) and the six token-shift mixes: xs [6, B, C]; sa_out[b] = ln1(x[b]) (the new shift_att). */
void rwkv7_batch_att_in(int64_t B, int64_t C, const void *const *params, int64_t l, double eps, const float *x,
                        const float *sa_in, float *sa_out, float *xs, int threads) {
    const float *const *P = (const float *const *)params + l * NP;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float xa[C];
        const float *prev = sa_in + b * C;
        norm_affine(x + b * C, xa, P[P_LN1W], P[P_LN1B], C, eps);
        for (int m = 0; m < 6; m++) {
            const float *mu = P[P_MUS] + m * C;
            float *o = xs + (m * B + b) * C;
            for (int64_t c = 0; c < C; c++) o[c] = xa[c] + (prev[c] - xa[c]) * mu[c];
        }
        memcpy(sa_out + b * C, xa, sizeof(float) * C);
    }
}

/* Everything between the projections and the output projection, one (row, head) pair per item: the decay, a and
 * value-residual gates from the LoRA outputs lo [n, B, C] (the last two already through tanh), kk, k, b, the WKV
 * state update (wkv_in -> wkv_out, [B, H, N, N]), the group norm, the bonus and the gate. y [B, C] is the output
 * projection's input; v_first [B, C] is written in layer 0 and read after. r, k, v [B, C] are overwritten. */
void rwkv7_batch_att_mid(int64_t B, int64_t C, int64_t H, const void *const *params, int64_t l, int64_t n,
                         double epsx, const float *r, float *k, float *v, const float *lo, float *vfirst,
                         const float *wkv_in, float *wkv_out, float *y, int threads) {
    const float *const *P = (const float *const *)params + l * NP;
    const int64_t N = C / H, BC = B * C;
    const float *lv = n == 4 ? lo : 0, *la = lo + (n - 3) * BC, *lw = la + BC, *g = lo + (n - 1) * BC;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t o = bh * N, c0 = (bh % H) * N;
        float dec[N], kk[N], bv[N], a[N];
        const float *lwo = lw + o, *lao = la + o, *kkw = P[P_KK] + c0, *omka = P[P_OMKA] + c0, *ka = P[P_KA] + c0;
        float *ko = k + o, *vo = v + o;
        for (int64_t j = 0; j < N; j++) {
            dec[j] = exp_f(-DECAY_SCALE * sigmoidf_(lwo[j]));
            a[j] = sigmoidf_(lao[j]);
            kk[j] = ko[j] * kkw[j];
            ko[j] *= omka[j] + a[j] * ka[j];
        }
        if (lv) {
            const float *lvo = lv + o, *vfo = vfirst + o;
            for (int64_t j = 0; j < N; j++) vo[j] += (vfo[j] - vo[j]) * sigmoidf_(lvo[j]);
        }
        if (l == 0) memcpy(vfirst + o, v + o, sizeof(float) * N);
        double ss = 0;
        for (int64_t j = 0; j < N; j++) ss += (double)kk[j] * kk[j];
        const double nrm = sqrt(ss);
        const float inv = (float)(1.0 / (nrm > 1e-12 ? nrm : 1e-12));
        for (int64_t j = 0; j < N; j++) {
            kk[j] *= inv;
            bv[j] = kk[j] * a[j];
        }
        float *yo = y + o;
        wkv_head(wkv_in + bh * N * N, wkv_out + bh * N * N, r + o, dec, k + o, v + o, kk, bv, yo, N);
        norm_affine(yo, yo, P[P_LNXW] + c0, P[P_LNXB] + c0, N, epsx);
        float bonus = 0;
        for (int64_t j = 0; j < N; j++) bonus += r[o + j] * k[o + j] * P[P_RK][c0 + j];
        for (int64_t j = 0; j < N; j++) yo[j] = (yo[j] + bonus * v[o + j]) * g[o + j];
    }
}

/* ln2(x) and the ffn's token-shift mix: xm [B, C]; sf_out[b] = ln2(x[b]) (the new shift_ffn). */
void rwkv7_batch_ffn_in(int64_t B, int64_t C, const void *const *params, int64_t l, double eps, const float *x,
                        const float *sf_in, float *sf_out, float *xm, int threads) {
    const float *const *P = (const float *const *)params + l * NP;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float xf[C];
        const float *prev = sf_in + b * C, *mu = P[P_FXK];
        float *o = xm + b * C;
        norm_affine(x + b * C, xf, P[P_LN2W], P[P_LN2B], C, eps);
        for (int64_t c = 0; c < C; c++) o[c] = xf[c] + (prev[c] - xf[c]) * mu[c];
        memcpy(sf_out + b * C, xf, sizeof(float) * C);
    }
}
