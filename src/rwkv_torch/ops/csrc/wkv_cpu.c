/* Fused CPU forward kernels of the WKV recurrences (rwkv_torch.ops.cpu_lib compiles and loads this file).
 *
 * The naive spec loop of ops/wkv7/naive.py and ops/wkv6/naive.py, one (batch, head) pair per work item, the state
 * held in cache for the whole sequence; and its exact reverse-time backward (see the BACKWARD section below).
 * Inputs r, w, k, v, a, b: [B, T, H, N] contiguous, all of one type (float or double); u: [H, N]; state: [B, H, N, N],
 * read as the initial state and overwritten with the final one; out: [B, T, H, N]. For training the forward also
 * writes the state before every L-th token (ckpt: [B, H, ceil(T / L), N, N], in the kernel's internal layout), which
 * the backward reloads to recompute the states of one span of L tokens at a time.
 *
 * WKV-7 (official layout S[i][j], i = value index, j = key index):
 *     sa = S a;  S = S * exp(w)[None, :] + sa b^T + v k^T;  y = S r
 * kept transposed inside (ST[j][i]) so that every update is a vertical multiply-add over i.
 * WKV-6 (official layout S[j][i], j = key index):
 *     y = r^T (S + diag(u) k v^T);  S = diag(exp(w)) S + k v^T
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float f32;
typedef double f64;

#define WKV7_HEAD(NAME, REAL, EXP, NFIXED)                                                                  \
    static int NAME(const REAL *r, const REAL *w, const REAL *k, const REAL *v, const REAL *a,             \
                    const REAL *bb, REAL *out, REAL *S, REAL *ckpt, int64_t L, int64_t T, int64_t H,       \
                    int64_t n, int64_t b, int64_t h) {                                                      \
        const int64_t N = NFIXED ? NFIXED : n;                                                              \
        REAL *buf = (REAL *)malloc(sizeof(REAL) * (N * N + 2 * N));                                         \
        if (!buf) return 1;                                                                                 \
        REAL *ST = buf, *sa = buf + N * N, *y = sa + N;                                                     \
        for (int64_t i = 0; i < N; i++)                                                                     \
            for (int64_t j = 0; j < N; j++) ST[j * N + i] = S[i * N + j];                                   \
        for (int64_t t = 0; t < T; t++) {                                                                   \
            const int64_t o = ((b * T + t) * H + h) * N;                                                    \
            if (ckpt && t % L == 0) memcpy(ckpt + (t / L) * N * N, ST, sizeof(REAL) * N * N);               \
            const REAL *rt = r + o, *wt = w + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o;       \
            for (int64_t i = 0; i < N; i++) sa[i] = 0, y[i] = 0;                                            \
            for (int64_t j = 0; j < N; j++) {                                                               \
                const REAL aj = at[j];                                                                      \
                const REAL *row = ST + j * N;                                                               \
                for (int64_t i = 0; i < N; i++) sa[i] += row[i] * aj;                                       \
            }                                                                                               \
            for (int64_t j = 0; j < N; j++) {                                                               \
                const REAL dj = EXP(wt[j]), bj = bt[j], kj = kt[j], rj = rt[j];                             \
                REAL *row = ST + j * N;                                                                     \
                for (int64_t i = 0; i < N; i++) {                                                           \
                    const REAL s = row[i] * dj + sa[i] * bj + vt[i] * kj;                                   \
                    row[i] = s;                                                                             \
                    y[i] += s * rj;                                                                         \
                }                                                                                           \
            }                                                                                               \
            memcpy(out + o, y, sizeof(REAL) * N);                                                           \
        }                                                                                                   \
        for (int64_t i = 0; i < N; i++)                                                                     \
            for (int64_t j = 0; j < N; j++) S[i * N + j] = ST[j * N + i];                                   \
        free(buf);                                                                                          \
        return 0;                                                                                           \
    }

#define WKV6_HEAD(NAME, REAL, EXP, NFIXED)                                                                  \
    static int NAME(const REAL *r, const REAL *w, const REAL *k, const REAL *v, const REAL *u,             \
                    REAL *out, REAL *S, REAL *ckpt, int64_t L, int64_t T, int64_t H, int64_t n, int64_t b,  \
                    int64_t h) {                                                                            \
        const int64_t N = NFIXED ? NFIXED : n;                                                              \
        REAL *y = (REAL *)malloc(sizeof(REAL) * N);                                                         \
        if (!y) return 1;                                                                                   \
        const REAL *uh = u + h * N;                                                                         \
        for (int64_t t = 0; t < T; t++) {                                                                   \
            const int64_t o = ((b * T + t) * H + h) * N;                                                    \
            if (ckpt && t % L == 0) memcpy(ckpt + (t / L) * N * N, S, sizeof(REAL) * N * N);                \
            const REAL *rt = r + o, *wt = w + o, *kt = k + o, *vt = v + o;                                  \
            for (int64_t i = 0; i < N; i++) y[i] = 0;                                                       \
            for (int64_t j = 0; j < N; j++) {                                                               \
                const REAL dj = EXP(wt[j]), kj = kt[j], rj = rt[j], ruk = rj * uh[j] * kj;                 \
                REAL *row = S + j * N;                                                                      \
                for (int64_t i = 0; i < N; i++) {                                                           \
                    const REAL s = row[i];                                                                  \
                    y[i] += rj * s + ruk * vt[i];                                                           \
                    row[i] = s * dj + kj * vt[i];                                                           \
                }                                                                                           \
            }                                                                                               \
            memcpy(out + o, y, sizeof(REAL) * N);                                                           \
        }                                                                                                   \
        free(y);                                                                                            \
        return 0;                                                                                           \
    }

/* BACKWARD. One (batch, head) pair, spans of L tokens from the last to the first: reload the span's checkpoint,
 * recompute its L + 1 states (and WKV-7's sa = S a) forward, then walk back token by token. dS holds the gradient of
 * the loss with respect to the state after the current token (internal layout); it starts as the final state's
 * gradient and ends as the initial state's. With D = diag(exp(w)), per token t (WKV-7, internal ST = S^T):
 *     dS += dy r^T;  dr = S_t^T dy;  dv = dS k;  dk = dS^T v;  db = dS^T sa;  dsa = dS b;
 *     dw = exp(w) * colsum(dS * S_{t-1});  da = S_{t-1}^T dsa;  dS <- dS D + dsa a^T
 * WKV-6 (S [K, V], y = r^T (S_{t-1} + diag(u) k v^T), S_t = D S_{t-1} + k v^T):
 *     dr = S_{t-1} dy + u k (v . dy);  du += r k (v . dy);  dk = r u (v . dy) + dS v;  dv = (r u k) . dy + dS^T k;
 *     dw = exp(w) * rowsum(dS * S_{t-1});  dS <- D dS + r dy^T
 * Gradients are written per token (du accumulated per pair into du_part [B, H, N], summed over B by the caller). */
#define WKV7_BACK(NAME, REAL, EXP, NFIXED)                                                                  \
    static int NAME(const REAL *r, const REAL *w, const REAL *k, const REAL *v, const REAL *a,             \
                    const REAL *bb, const REAL *dy, const REAL *ckpt, REAL *dS_io, REAL *dr, REAL *dw,      \
                    REAL *dk, REAL *dv, REAL *da, REAL *db, int64_t L, int64_t T, int64_t H, int64_t n,     \
                    int64_t b, int64_t h) {                                                                 \
        const int64_t N = NFIXED ? NFIXED : n, NN = N * N;                                                  \
        REAL *buf = (REAL *)malloc(sizeof(REAL) * ((L + 1) * NN + NN + L * N + 2 * N));                     \
        if (!buf) return 1;                                                                                 \
        REAL *Ss = buf, *dS = Ss + (L + 1) * NN, *sas = dS + NN, *dsa = sas + L * N, *dvv = dsa + N;        \
        for (int64_t i = 0; i < N; i++)                                                                     \
            for (int64_t j = 0; j < N; j++) dS[j * N + i] = dS_io[i * N + j];                               \
        for (int64_t c = (T + L - 1) / L - 1; c >= 0; c--) {                                                \
            const int64_t t0 = c * L, t1 = t0 + L < T ? t0 + L : T;                                         \
            memcpy(Ss, ckpt + c * NN, sizeof(REAL) * NN);                                                   \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const int64_t o = ((b * T + t) * H + h) * N;                                                \
                const REAL *P = Ss + (t - t0) * NN, *at = a + o, *bt = bb + o, *wt = w + o;                 \
                const REAL *kt = k + o, *vt = v + o;                                                        \
                REAL *Sn = Ss + (t - t0 + 1) * NN, *sa = sas + (t - t0) * N;                                \
                for (int64_t i = 0; i < N; i++) sa[i] = 0;                                                  \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL aj = at[j];                                                                  \
                    const REAL *row = P + j * N;                                                            \
                    for (int64_t i = 0; i < N; i++) sa[i] += row[i] * aj;                                   \
                }                                                                                           \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL dj = EXP(wt[j]), bj = bt[j], kj = kt[j];                                     \
                    const REAL *row = P + j * N;                                                            \
                    REAL *nrow = Sn + j * N;                                                                \
                    for (int64_t i = 0; i < N; i++) nrow[i] = row[i] * dj + sa[i] * bj + vt[i] * kj;        \
                }                                                                                           \
            }                                                                                               \
            for (int64_t t = t1 - 1; t >= t0; t--) {                                                        \
                const int64_t o = ((b * T + t) * H + h) * N;                                                \
                const REAL *P = Ss + (t - t0) * NN, *St = P + NN, *sa = sas + (t - t0) * N;                 \
                const REAL *rt = r + o, *wt = w + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o;   \
                const REAL *g = dy + o;                                                                     \
                for (int64_t i = 0; i < N; i++) dsa[i] = 0, dvv[i] = 0;                                     \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL rj = rt[j], kj = kt[j], bj = bt[j];                                          \
                    const REAL *srow = St + j * N, *prow = P + j * N;                                       \
                    REAL *drow = dS + j * N;                                                                \
                    REAL s_r = 0, s_k = 0, s_b = 0, s_w = 0;                                                \
                    for (int64_t i = 0; i < N; i++) {                                                       \
                        const REAL d = drow[i] + rj * g[i];                                                 \
                        drow[i] = d;                                                                        \
                        s_r += srow[i] * g[i];                                                              \
                        s_k += d * vt[i];                                                                   \
                        s_b += d * sa[i];                                                                   \
                        s_w += d * prow[i];                                                                 \
                        dvv[i] += d * kj;                                                                   \
                        dsa[i] += d * bj;                                                                   \
                    }                                                                                       \
                    dr[o + j] = s_r, dk[o + j] = s_k, db[o + j] = s_b, dw[o + j] = s_w * EXP(wt[j]);        \
                }                                                                                           \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL dj = EXP(wt[j]), aj = at[j];                                                 \
                    const REAL *prow = P + j * N;                                                           \
                    REAL *drow = dS + j * N;                                                                \
                    REAL s_a = 0;                                                                           \
                    for (int64_t i = 0; i < N; i++) {                                                       \
                        s_a += dsa[i] * prow[i];                                                            \
                        drow[i] = drow[i] * dj + dsa[i] * aj;                                               \
                    }                                                                                       \
                    da[o + j] = s_a;                                                                        \
                }                                                                                           \
                memcpy(dv + o, dvv, sizeof(REAL) * N);                                                      \
            }                                                                                               \
        }                                                                                                   \
        for (int64_t i = 0; i < N; i++)                                                                     \
            for (int64_t j = 0; j < N; j++) dS_io[i * N + j] = dS[j * N + i];                               \
        free(buf);                                                                                          \
        return 0;                                                                                           \
    }

#define WKV6_BACK(NAME, REAL, EXP, NFIXED)                                                                  \
    static int NAME(const REAL *r, const REAL *w, const REAL *k, const REAL *v, const REAL *u,             \
                    const REAL *dy, const REAL *ckpt, REAL *dS, REAL *dr, REAL *dw, REAL *dk, REAL *dv,     \
                    REAL *du, int64_t L, int64_t T, int64_t H, int64_t n, int64_t b, int64_t h) {           \
        const int64_t N = NFIXED ? NFIXED : n, NN = N * N;                                                  \
        REAL *buf = (REAL *)malloc(sizeof(REAL) * ((L + 1) * NN + N));                                      \
        if (!buf) return 1;                                                                                 \
        REAL *Ss = buf, *dvv = Ss + (L + 1) * NN;                                                           \
        const REAL *uh = u + h * N;                                                                         \
        for (int64_t j = 0; j < N; j++) du[j] = 0;                                                          \
        for (int64_t c = (T + L - 1) / L - 1; c >= 0; c--) {                                                \
            const int64_t t0 = c * L, t1 = t0 + L < T ? t0 + L : T;                                         \
            memcpy(Ss, ckpt + c * NN, sizeof(REAL) * NN);                                                   \
            for (int64_t t = t0; t < t1 - 1; t++) {                                                         \
                const int64_t o = ((b * T + t) * H + h) * N;                                                \
                const REAL *P = Ss + (t - t0) * NN, *wt = w + o, *kt = k + o, *vt = v + o;                  \
                REAL *Sn = Ss + (t - t0 + 1) * NN;                                                          \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL dj = EXP(wt[j]), kj = kt[j];                                                 \
                    const REAL *row = P + j * N;                                                            \
                    REAL *nrow = Sn + j * N;                                                                \
                    for (int64_t i = 0; i < N; i++) nrow[i] = row[i] * dj + kj * vt[i];                     \
                }                                                                                           \
            }                                                                                               \
            for (int64_t t = t1 - 1; t >= t0; t--) {                                                        \
                const int64_t o = ((b * T + t) * H + h) * N;                                                \
                const REAL *P = Ss + (t - t0) * NN;                                                         \
                const REAL *rt = r + o, *wt = w + o, *kt = k + o, *vt = v + o, *g = dy + o;                 \
                REAL vg = 0;                                                                                \
                for (int64_t i = 0; i < N; i++) vg += vt[i] * g[i], dvv[i] = 0;                             \
                for (int64_t j = 0; j < N; j++) {                                                           \
                    const REAL rj = rt[j], kj = kt[j], dj = EXP(wt[j]), ruk = rj * uh[j] * kj;              \
                    const REAL *prow = P + j * N;                                                           \
                    REAL *drow = dS + j * N;                                                                \
                    REAL s_r = 0, s_k = 0, s_w = 0;                                                         \
                    for (int64_t i = 0; i < N; i++) {                                                       \
                        const REAL d = drow[i];                                                             \
                        s_r += prow[i] * g[i];                                                              \
                        s_k += d * vt[i];                                                                   \
                        s_w += d * prow[i];                                                                 \
                        dvv[i] += d * kj + ruk * g[i];                                                      \
                        drow[i] = d * dj + rj * g[i];                                                       \
                    }                                                                                       \
                    dr[o + j] = s_r + uh[j] * kj * vg;                                                      \
                    dk[o + j] = s_k + rj * uh[j] * vg;                                                      \
                    dw[o + j] = s_w * dj;                                                                   \
                    du[j] += rj * kj * vg;                                                                  \
                }                                                                                           \
                memcpy(dv + o, dvv, sizeof(REAL) * N);                                                      \
            }                                                                                               \
        }                                                                                                   \
        free(buf);                                                                                          \
        return 0;                                                                                           \
    }

/* AVX2 + FMA forms of the f32, N = 64 loops (the head size of every RWKV-6/7 model): the same arithmetic as
 * WKV7_HEAD / WKV7_BACK / WKV6_HEAD / WKV6_BACK above, register-blocked by hand. Eight-float vectors run along the
 * value index i (contiguous in every row of the state); the sums over i that give the per-key gradients (dr, dk, db,
 * dw, da) are kept as one vector of partial sums per row and reduced eight rows at a time (hsum8); the decays exp(w)
 * of a token are computed once, eight at a time (exp8). Built only where the compiler targets AVX2 and FMA
 * (-march=native on such a CPU); elsewhere the portable loops above serve N = 64 too. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WKV_VECTOR 1
/* The float32 loops for head sizes 16, 32 and 64 as AVX2 + FMA code, N / 8 eight-lane vectors per state row. Every
 * helper below takes the head size as an argument and is inlined into a function that fixes it (the _n16, _n32 and
 * _n64 instantiations at the end of this section), so that each head size gets its own unrolled loops. */
#define INLINE static inline __attribute__((always_inline))

typedef __m256 v8;
#define LD(p) _mm256_load_ps(p)   /* 32-byte aligned: the kernel's own buffers */
#define LDU(p) _mm256_loadu_ps(p) /* the caller's tensors: 4-byte aligned */
#define STA(p, x) _mm256_store_ps(p, x)
#define STU(p, x) _mm256_storeu_ps(p, x)
#define BC(s) _mm256_set1_ps(s)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MUL(a, b) _mm256_mul_ps(a, b)

/* exp of eight floats: 2^n e^f with n = round(x / ln 2) and a degree-6 polynomial for e^f, |f| <= ln(2) / 2 (a few
 * ulp from expf); 0 below -87.3 (where expf turns denormal), inf above 88.7, NaN kept. 2^n is applied in two halves so
 * that each stays a normal float over the whole range. */
static inline v8 exp8(v8 x) {
    const v8 lo = BC(-87.33654f), hi = BC(88.72283f);
    const v8 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const v8 n = _mm256_round_ps(MUL(xc, BC(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v8 f = FMA(n, BC(-0.693359375f), xc);
    f = FMA(n, BC(2.12194440e-4f), f);
    v8 p = BC(1.9875691500e-4f);
    p = FMA(p, f, BC(1.3981999507e-3f));
    p = FMA(p, f, BC(8.3334519073e-3f));
    p = FMA(p, f, BC(4.1665795894e-2f));
    p = FMA(p, f, BC(1.6666665459e-1f));
    p = FMA(p, f, BC(5.0000001201e-1f));
    p = FMA(MUL(p, f), f, _mm256_add_ps(f, BC(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const v8 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const v8 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    v8 y = MUL(MUL(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, BC(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* d[0..N-1] = exp(w[0..N-1]) */
INLINE void expv(const f32 *w, f32 *d, int N) {
    for (int q = 0; q < N / 8; q++) STA(d + 8 * q, exp8(LDU(w + 8 * q)));
}

/* Lane j of the result: the sum of the eight lanes of p[8 j .. 8 j + 7] (eight rows of partial sums). */
static inline v8 hsum8(const f32 *p) {
    const v8 s01 = _mm256_hadd_ps(LD(p), LD(p + 8)), s23 = _mm256_hadd_ps(LD(p + 16), LD(p + 24));
    const v8 s45 = _mm256_hadd_ps(LD(p + 32), LD(p + 40)), s67 = _mm256_hadd_ps(LD(p + 48), LD(p + 56));
    const v8 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* The sum of the eight lanes of x. */
static inline f32 hsum1(v8 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* sa = S a for the internal layout: sa[i] = sum_j ST[j][i] a[j]. */
INLINE void state_times(const f32 *ST, const f32 *a, f32 *sa, int N) {
    v8 s[8];
    for (int q = 0; q < N / 8; q++) s[q] = _mm256_setzero_ps();
    for (int j = 0; j < N; j++) {
        const v8 aj = BC(a[j]);
        for (int q = 0; q < N / 8; q++) s[q] = FMA(LD(ST + N * j + 8 * q), aj, s[q]);
    }
    for (int q = 0; q < N / 8; q++) STA(sa + 8 * q, s[q]);
}

/* Vectors of i per pass of the state updates: up to four, so that sa, v and y stay in registers over the rows. */
#define QBLOCK(N) ((N) / 8 < 4 ? (N) / 8 : 4)

/* One token's update Sn[j][i] = P[j][i] d[j] + sa[i] b[j] + v[i] k[j] (Sn may be P); with r, also y = Sn r. */
INLINE void state_update(const f32 *P, f32 *Sn, const f32 *d, const f32 *sa, const f32 *bt, const f32 *kt,
                         const f32 *vt, const f32 *rt, f32 *y, int N) {
    const int QB = QBLOCK(N);
    for (int q0 = 0; q0 < N / 8; q0 += QB) {
        v8 s[4], vv[4], yy[4];
        for (int q = 0; q < QB; q++) s[q] = LD(sa + 8 * (q0 + q)), vv[q] = LDU(vt + 8 * (q0 + q)), yy[q] = _mm256_setzero_ps();
        for (int j = 0; j < N; j++) {
            const v8 dj = BC(d[j]), bj = BC(bt[j]), kj = BC(kt[j]);
            const f32 *row = P + N * j + 8 * q0;
            f32 *nrow = Sn + N * j + 8 * q0;
            if (rt) {
                const v8 rj = BC(rt[j]);
                for (int q = 0; q < QB; q++) {
                    const v8 x = FMA(LD(row + 8 * q), dj, FMA(s[q], bj, MUL(vv[q], kj)));
                    STA(nrow + 8 * q, x);
                    yy[q] = FMA(x, rj, yy[q]);
                }
            } else {
                for (int q = 0; q < QB; q++) STA(nrow + 8 * q, FMA(LD(row + 8 * q), dj, FMA(s[q], bj, MUL(vv[q], kj))));
            }
        }
        if (rt)
            for (int q = 0; q < QB; q++) STU(y + 8 * (q0 + q), yy[q]);
    }
}

INLINE int wkv7_vec(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *a, const f32 *bb, f32 *out,
                    f32 *S, f32 *ckpt, int64_t L, int64_t T, int64_t H, int64_t b, int64_t h, int N) {
    const int NN = N * N;
    f32 *buf = (f32 *)aligned_alloc(32, sizeof(f32) * (NN + 2 * N));
    if (!buf) return 1;
    f32 *ST = buf, *d = buf + NN, *sa = d + N;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) ST[j * N + i] = S[i * N + j];
    for (int64_t t = 0; t < T; t++) {
        const int64_t o = ((b * T + t) * H + h) * N;
        if (ckpt && t % L == 0) memcpy(ckpt + (t / L) * NN, ST, sizeof(f32) * NN);
        state_times(ST, a + o, sa, N);
        expv(w + o, d, N);
        state_update(ST, ST, d, sa, bb + o, k + o, v + o, r + o, out + o, N);
    }
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) S[i * N + j] = ST[j * N + i];
    free(buf);
    return 0;
}

/* The WKV7_BACK formulas with two changes: dr = S_t^T dy is taken from S_{t-1} through the update's form,
 *     dr = exp(w) * (S_{t-1}^T dy) + b (sa . dy) + k (v . dy),
 * so a span keeps only the states before its tokens (the pass over dS reads one state per token, not two), and the
 * row sums are eight-lane partials reduced by hsum8. */
INLINE int wkv7_back_vec(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *a, const f32 *bb,
                         const f32 *dy, const f32 *ckpt, f32 *dS_io, f32 *dr, f32 *dw, f32 *dk, f32 *dv, f32 *da,
                         f32 *db, int64_t L, int64_t T, int64_t H, int64_t b, int64_t h, int N) {
    const int NN = N * N, Q = N / 8;
    /* states of one span, dS, sa of each token of the span, dsa, dv, decays, and five [N][8] partial-sum blocks */
    f32 *buf = (f32 *)aligned_alloc(32, sizeof(f32) * (L * NN + NN + L * N + 3 * N + 5 * 8 * N));
    if (!buf) return 1;
    f32 *Ss = buf, *dS = Ss + L * NN, *sas = dS + NN, *dsa = sas + L * N, *dvv = dsa + N, *d = dvv + N;
    f32 *pr = d + N, *pk = pr + 8 * N, *pb = pk + 8 * N, *pw = pb + 8 * N, *pa = pw + 8 * N;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) dS[j * N + i] = dS_io[i * N + j];
    for (int64_t c = (T + L - 1) / L - 1; c >= 0; c--) {
        const int64_t t0 = c * L, t1 = t0 + L < T ? t0 + L : T;
        memcpy(Ss, ckpt + c * NN, sizeof(f32) * NN);
        for (int64_t t = t0; t < t1; t++) {
            const int64_t o = ((b * T + t) * H + h) * N;
            f32 *P = Ss + (t - t0) * NN;
            state_times(P, a + o, sas + (t - t0) * N, N);
            if (t + 1 == t1) break;
            expv(w + o, d, N);
            state_update(P, P + NN, d, sas + (t - t0) * N, bb + o, k + o, v + o, 0, 0, N);
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t o = ((b * T + t) * H + h) * N;
            const f32 *P = Ss + (t - t0) * NN, *sa = sas + (t - t0) * N;
            const f32 *rt = r + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = bb + o, *g = dy + o;
            expv(w + o, d, N);
            /* dS += dy r^T; per row j the partial sums of S_{t-1}^T dy, dk = dS^T v, db = dS^T sa and
             * colsum(dS * S_{t-1}); dv = dS k and dsa = dS b over the rows */
            v8 gg[8], vv[8], sg = _mm256_setzero_ps(), vg = sg;
            for (int q = 0; q < Q; q++) {
                gg[q] = LDU(g + 8 * q), vv[q] = LDU(vt + 8 * q);
                sg = FMA(LD(sa + 8 * q), gg[q], sg), vg = FMA(vv[q], gg[q], vg);
                STA(dvv + 8 * q, _mm256_setzero_ps()), STA(dsa + 8 * q, _mm256_setzero_ps());
            }
            for (int j = 0; j < N; j++) {
                const v8 rj = BC(rt[j]), kj = BC(kt[j]), bj = BC(bt[j]);
                const f32 *prow = P + N * j;
                f32 *drow = dS + N * j;
                v8 s_r = _mm256_setzero_ps(), s_k = s_r, s_b = s_r, s_w = s_r;
                for (int q = 0; q < Q; q++) {
                    const v8 x = FMA(rj, gg[q], LD(drow + 8 * q)), p = LD(prow + 8 * q);
                    STA(drow + 8 * q, x);
                    s_r = FMA(p, gg[q], s_r);
                    s_k = FMA(x, vv[q], s_k);
                    s_b = FMA(x, LD(sa + 8 * q), s_b);
                    s_w = FMA(x, p, s_w);
                    STA(dvv + 8 * q, FMA(x, kj, LD(dvv + 8 * q)));
                    STA(dsa + 8 * q, FMA(x, bj, LD(dsa + 8 * q)));
                }
                STA(pr + 8 * j, s_r), STA(pk + 8 * j, s_k), STA(pb + 8 * j, s_b), STA(pw + 8 * j, s_w);
            }
            const v8 sgs = BC(hsum1(sg)), vgs = BC(hsum1(vg));
            for (int q = 0; q < Q; q++) {
                const v8 dq = LD(d + 8 * q);
                STU(dr + o + 8 * q, FMA(dq, hsum8(pr + 64 * q), FMA(LDU(bt + 8 * q), sgs, MUL(LDU(kt + 8 * q), vgs))));
                STU(dk + o + 8 * q, hsum8(pk + 64 * q));
                STU(db + o + 8 * q, hsum8(pb + 64 * q));
                STU(dw + o + 8 * q, MUL(hsum8(pw + 64 * q), dq));
            }
            memcpy(dv + o, dvv, sizeof(f32) * N);
            /* da = S_{t-1}^T dsa;  dS <- dS D + dsa a^T */
            v8 ds[8];
            for (int q = 0; q < Q; q++) ds[q] = LD(dsa + 8 * q);
            for (int j = 0; j < N; j++) {
                const v8 dj = BC(d[j]), aj = BC(at[j]);
                const f32 *prow = P + N * j;
                f32 *drow = dS + N * j;
                v8 s_a = _mm256_setzero_ps();
                for (int q = 0; q < Q; q++) {
                    s_a = FMA(ds[q], LD(prow + 8 * q), s_a);
                    STA(drow + 8 * q, FMA(LD(drow + 8 * q), dj, MUL(ds[q], aj)));
                }
                STA(pa + 8 * j, s_a);
            }
            for (int q = 0; q < Q; q++) STU(da + o + 8 * q, hsum8(pa + 64 * q));
        }
    }
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) dS_io[i * N + j] = dS[j * N + i];
    free(buf);
    return 0;
}

/* WKV-6's bonus weight of a token, sum_j r_j u_j k_j, in every lane. */
INLINE v8 bonus6(const f32 *rt, const f32 *uh, const f32 *kt, int N) {
    v8 c = _mm256_setzero_ps();
    for (int q = 0; q < N / 8; q++) c = FMA(MUL(LDU(rt + 8 * q), LDU(uh + 8 * q)), LDU(kt + 8 * q), c);
    return BC(hsum1(c));
}

/* One WKV-6 token: Sn[j][i] = P[j][i] d[j] + k[j] v[i] (Sn may be P); with r, also y = r^T P + bonus v. */
INLINE void state_update6(const f32 *P, f32 *Sn, const f32 *d, const f32 *kt, const f32 *vt, const f32 *rt, v8 bonus,
                          f32 *y, int N) {
    const int QB = QBLOCK(N);
    for (int q0 = 0; q0 < N / 8; q0 += QB) {
        v8 vv[4], yy[4];
        for (int q = 0; q < QB; q++) vv[q] = LDU(vt + 8 * (q0 + q)), yy[q] = MUL(vv[q], bonus);
        for (int j = 0; j < N; j++) {
            const v8 dj = BC(d[j]), kj = BC(kt[j]);
            const f32 *row = P + N * j + 8 * q0;
            f32 *nrow = Sn + N * j + 8 * q0;
            if (rt) {
                const v8 rj = BC(rt[j]);
                for (int q = 0; q < QB; q++) {
                    const v8 x = LDU(row + 8 * q);
                    yy[q] = FMA(rj, x, yy[q]);
                    STU(nrow + 8 * q, FMA(x, dj, MUL(vv[q], kj)));
                }
            } else {
                for (int q = 0; q < QB; q++) STU(nrow + 8 * q, FMA(LDU(row + 8 * q), dj, MUL(vv[q], kj)));
            }
        }
        if (rt)
            for (int q = 0; q < QB; q++) STU(y + 8 * (q0 + q), yy[q]);
    }
}

/* WKV-6 (official layout S[j][i], rows j over the key index, contiguous in i): y = r^T S_{t-1} + (sum_j r_j u_j k_j) v
 * and S_t = D S_{t-1} + k v^T. */
INLINE int wkv6_vec(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *u, f32 *out, f32 *S, f32 *ckpt,
                    int64_t L, int64_t T, int64_t H, int64_t b, int64_t h, int N) {
    const int NN = N * N;
    f32 *d = (f32 *)aligned_alloc(32, sizeof(f32) * N);
    if (!d) return 1;
    const f32 *uh = u + h * N;
    for (int64_t t = 0; t < T; t++) {
        const int64_t o = ((b * T + t) * H + h) * N;
        const f32 *rt = r + o, *kt = k + o, *vt = v + o;
        if (ckpt && t % L == 0) memcpy(ckpt + (t / L) * NN, S, sizeof(f32) * NN);
        expv(w + o, d, N);
        state_update6(S, S, d, kt, vt, rt, bonus6(rt, uh, kt, N), out + o, N);
    }
    free(d);
    return 0;
}

/* The WKV6_BACK formulas with dS D + r dy^T kept per row, the row sums as eight-lane partials (hsum8), and
 * dv = dS^T k + (sum_j r_j u_j k_j) dy. */
INLINE int wkv6_back_vec(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *u, const f32 *dy,
                         const f32 *ckpt, f32 *dS, f32 *dr, f32 *dw, f32 *dk, f32 *dv, f32 *du, int64_t L, int64_t T,
                         int64_t H, int64_t b, int64_t h, int N) {
    const int NN = N * N, Q = N / 8;
    f32 *buf = (f32 *)aligned_alloc(32, sizeof(f32) * (L * NN + 2 * N + 3 * 8 * N));
    if (!buf) return 1;
    f32 *Ss = buf, *d = Ss + L * NN, *dvv = d + N, *pr = dvv + N, *pk = pr + 8 * N, *pw = pk + 8 * N;
    const f32 *uh = u + h * N;
    v8 dus[8];
    for (int q = 0; q < Q; q++) dus[q] = _mm256_setzero_ps();
    for (int64_t c = (T + L - 1) / L - 1; c >= 0; c--) {
        const int64_t t0 = c * L, t1 = t0 + L < T ? t0 + L : T;
        memcpy(Ss, ckpt + c * NN, sizeof(f32) * NN);
        for (int64_t t = t0; t < t1 - 1; t++) {
            const int64_t o = ((b * T + t) * H + h) * N;
            f32 *P = Ss + (t - t0) * NN;
            expv(w + o, d, N);
            state_update6(P, P + NN, d, k + o, v + o, 0, _mm256_setzero_ps(), 0, N);
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t o = ((b * T + t) * H + h) * N;
            const f32 *P = Ss + (t - t0) * NN, *rt = r + o, *kt = k + o, *vt = v + o, *g = dy + o;
            expv(w + o, d, N);
            v8 gg[8], vv[8], vg = _mm256_setzero_ps();
            for (int q = 0; q < Q; q++) {
                gg[q] = LDU(g + 8 * q), vv[q] = LDU(vt + 8 * q);
                vg = FMA(vv[q], gg[q], vg);
                STA(dvv + 8 * q, _mm256_setzero_ps());
            }
            const v8 vgs = BC(hsum1(vg)), bonus = bonus6(rt, uh, kt, N);
            for (int j = 0; j < N; j++) {
                const v8 rj = BC(rt[j]), kj = BC(kt[j]), dj = BC(d[j]);
                const f32 *prow = P + N * j;
                f32 *drow = dS + N * j;
                v8 s_r = _mm256_setzero_ps(), s_k = s_r, s_w = s_r;
                for (int q = 0; q < Q; q++) {
                    const v8 x = LDU(drow + 8 * q), p = LD(prow + 8 * q);
                    s_r = FMA(p, gg[q], s_r);
                    s_k = FMA(x, vv[q], s_k);
                    s_w = FMA(x, p, s_w);
                    STA(dvv + 8 * q, FMA(x, kj, LD(dvv + 8 * q)));
                    STU(drow + 8 * q, FMA(x, dj, MUL(rj, gg[q])));
                }
                STA(pr + 8 * j, s_r), STA(pk + 8 * j, s_k), STA(pw + 8 * j, s_w);
            }
            for (int q = 0; q < Q; q++) {
                const v8 rq = LDU(rt + 8 * q), kq = LDU(kt + 8 * q), uq = LDU(uh + 8 * q), ukv = MUL(uq, vgs);
                STU(dr + o + 8 * q, FMA(kq, ukv, hsum8(pr + 64 * q)));
                STU(dk + o + 8 * q, FMA(rq, ukv, hsum8(pk + 64 * q)));
                STU(dw + o + 8 * q, MUL(hsum8(pw + 64 * q), LD(d + 8 * q)));
                STU(dv + o + 8 * q, FMA(gg[q], bonus, LD(dvv + 8 * q)));
                dus[q] = FMA(MUL(rq, kq), vgs, dus[q]);
            }
        }
    }
    for (int q = 0; q < Q; q++) STU(du + 8 * q, dus[q]);
    free(buf);
    return 0;
}
/* The instantiations: one set of loops per vectorised head size. */
#define WKV_VEC(NV)                                                                                         \
    static int wkv7_f32_n##NV(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *a,        \
                              const f32 *bb, f32 *out, f32 *S, f32 *ckpt, int64_t L, int64_t T, int64_t H, \
                              int64_t n, int64_t b, int64_t h) {                                            \
        (void)n;                                                                                            \
        return wkv7_vec(r, w, k, v, a, bb, out, S, ckpt, L, T, H, b, h, NV);                                \
    }                                                                                                       \
    static int wkv7_back_f32_n##NV(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *a,   \
                                   const f32 *bb, const f32 *dy, const f32 *ckpt, f32 *dS, f32 *dr,         \
                                   f32 *dw, f32 *dk, f32 *dv, f32 *da, f32 *db, int64_t L, int64_t T,       \
                                   int64_t H, int64_t n, int64_t b, int64_t h) {                            \
        (void)n;                                                                                            \
        return wkv7_back_vec(r, w, k, v, a, bb, dy, ckpt, dS, dr, dw, dk, dv, da, db, L, T, H, b, h, NV);   \
    }                                                                                                       \
    static int wkv6_f32_n##NV(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *u,        \
                              f32 *out, f32 *S, f32 *ckpt, int64_t L, int64_t T, int64_t H, int64_t n,      \
                              int64_t b, int64_t h) {                                                       \
        (void)n;                                                                                            \
        return wkv6_vec(r, w, k, v, u, out, S, ckpt, L, T, H, b, h, NV);                                    \
    }                                                                                                       \
    static int wkv6_back_f32_n##NV(const f32 *r, const f32 *w, const f32 *k, const f32 *v, const f32 *u,   \
                                   const f32 *dy, const f32 *ckpt, f32 *dS, f32 *dr, f32 *dw, f32 *dk,      \
                                   f32 *dv, f32 *du, int64_t L, int64_t T, int64_t H, int64_t n, int64_t b, \
                                   int64_t h) {                                                             \
        (void)n;                                                                                            \
        return wkv6_back_vec(r, w, k, v, u, dy, ckpt, dS, dr, dw, dk, dv, du, L, T, H, b, h, NV);           \
    }
WKV_VEC(16)
WKV_VEC(32)
WKV_VEC(64)
#endif

WKV7_HEAD(wkv7_f32, f32, expf, 0)
#ifndef WKV_VECTOR
WKV7_HEAD(wkv7_f32_n64, f32, expf, 64)
#endif
WKV7_HEAD(wkv7_f64, f64, exp, 0)
WKV6_HEAD(wkv6_f32, f32, expf, 0)
#ifndef WKV_VECTOR
WKV6_HEAD(wkv6_f32_n64, f32, expf, 64)
#endif
WKV6_HEAD(wkv6_f64, f64, exp, 0)
WKV7_BACK(wkv7_back_f32, f32, expf, 0)
#ifndef WKV_VECTOR
WKV7_BACK(wkv7_back_f32_n64, f32, expf, 64)
#endif
WKV7_BACK(wkv7_back_f64, f64, exp, 0)
WKV6_BACK(wkv6_back_f32, f32, expf, 0)
#ifndef WKV_VECTOR
WKV6_BACK(wkv6_back_f32_n64, f32, expf, 64)
#endif
WKV6_BACK(wkv6_back_f64, f64, exp, 0)

/* One call's arguments. Forward: x = r, w, k, v, a (u for WKV-6), b; y = out; S = state; ckpt may be null.
 * Backward: also dy, the output gradients g[0..5] = dr, dw, dk, dv, da (du_part for WKV-6), db; S = the final
 * state's gradient in, the initial state's out. */
typedef struct {
    int version, dbl, backward;
    const void *x[6];
    const void *dy;
    void *y, *S, *ckpt, *g[6];
    int64_t L, T, H, N;
} job_t;

/* One (batch, head) pair x of a job, in REAL; N64: the variant specialised for N = 64 (SUFFIX _n64). */
#define RUN_ONE(NAME, REAL, SUFFIX)                                                                         \
    static int NAME(const job_t *j, int64_t x) {                                                            \
        const int64_t b = x / j->H, h = x % j->H, NN = j->N * j->N, nck = (j->T + j->L - 1) / j->L;        \
        const REAL *r = j->x[0], *w = j->x[1], *k = j->x[2], *v = j->x[3], *a = j->x[4], *bb = j->x[5];    \
        const REAL *dy = j->dy;                                                                             \
        REAL *S = (REAL *)j->S + x * NN, *ck = j->ckpt ? (REAL *)j->ckpt + x * nck * NN : 0;                \
        REAL *const *g = (REAL *const *)j->g;                                                               \
        if (!j->backward && j->version == 7)                                                                \
            return wkv7_##REAL##SUFFIX(r, w, k, v, a, bb, j->y, S, ck, j->L, j->T, j->H, j->N, b, h);        \
        if (!j->backward)                                                                                   \
            return wkv6_##REAL##SUFFIX(r, w, k, v, a, j->y, S, ck, j->L, j->T, j->H, j->N, b, h);            \
        if (j->version == 7)                                                                                \
            return wkv7_back_##REAL##SUFFIX(r, w, k, v, a, bb, dy, ck, S, g[0], g[1], g[2], g[3], g[4], g[5], \
                                             j->L, j->T, j->H, j->N, b, h);                                 \
        return wkv6_back_##REAL##SUFFIX(r, w, k, v, a, dy, ck, S, g[0], g[1], g[2], g[3], g[4] + x * j->N,   \
                                         j->L, j->T, j->H, j->N, b, h);                                     \
    }

RUN_ONE(run_f32, f32, )
RUN_ONE(run_f32_n64, f32, _n64)
#ifdef WKV_VECTOR
RUN_ONE(run_f32_n32, f32, _n32)
RUN_ONE(run_f32_n16, f32, _n16)
#endif
RUN_ONE(run_f64, f64, )

static int run_one(const job_t *j, int64_t x) {
    if (j->dbl) return run_f64(j, x);
    switch (j->N) {
    case 64: return run_f32_n64(j, x);
#ifdef WKV_VECTOR
    case 32: return run_f32_n32(j, x);
    case 16: return run_f32_n16(j, x);
#endif
    default: return run_f32(j, x);
    }
}

typedef struct {
    const job_t *job;
    int64_t lo, hi;
    int err;
} share_t;

static void *run_share(void *arg) {
    share_t *s = (share_t *)arg;
    for (int64_t x = s->lo; x < s->hi && !s->err; x++) s->err = run_one(s->job, x);
    return 0;
}

#define MAX_THREADS 256

/* Splits the B*H (batch, head) pairs over up to `threads` threads. Returns 0 on success.
 * Built with OpenMP (-fopenmp), the loop runs on the OpenMP runtime already loaded by PyTorch (same libgomp), so the
 * kernel shares PyTorch's worker threads instead of competing with them for the cores; otherwise on pthreads. */
static int run(const job_t *job, int64_t B, int threads) {
    const int64_t work = B * job->H;
    if (work <= 0) return 0;
    if (threads > work) threads = (int)work;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
    int err = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : err)
    for (int64_t x = 0; x < work; x++) err |= run_one(job, x);
    return err;
#else
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    share_t shares[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        shares[i] = (share_t){job, work * i / threads, work * (i + 1) / threads, 0};
        started[i] = 0;
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tids[i], 0, run_share, &shares[i]) == 0;
    run_share(&shares[0]);
    int err = shares[0].err;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tids[i], 0);
        else run_share(&shares[i]);  /* no thread: do its share here */
        err |= shares[i].err;
    }
    return err;
#endif
}

/* Forward: state is read as the initial and overwritten with the final state; ckpt (null: none kept) receives the
 * state before every L-th token. */
int rwkv_wkv7_forward(const void *r, const void *w, const void *k, const void *v, const void *a, const void *b,
                      void *out, void *state, void *ckpt, int64_t B, int64_t T, int64_t H, int64_t N, int64_t L,
                      int dbl, int threads) {
    job_t j = {7, dbl, 0, {r, w, k, v, a, b}, 0, out, state, ckpt, {0}, L > 0 ? L : 1, T, H, N};
    return run(&j, B, threads);
}

int rwkv_wkv6_forward(const void *r, const void *w, const void *k, const void *v, const void *u, void *out,
                      void *state, void *ckpt, int64_t B, int64_t T, int64_t H, int64_t N, int64_t L, int dbl,
                      int threads) {
    job_t j = {6, dbl, 0, {r, w, k, v, u, 0}, 0, out, state, ckpt, {0}, L > 0 ? L : 1, T, H, N};
    return run(&j, B, threads);
}

/* Backward from the forward's checkpoints: dstate holds the final state's gradient ([B, H, N, N], official layout)
 * and is overwritten with the initial state's; dr..db: [B, T, H, N]. */
int rwkv_wkv7_backward(const void *r, const void *w, const void *k, const void *v, const void *a, const void *b,
                       const void *dy, const void *ckpt, void *dstate, void *dr, void *dw, void *dk, void *dv,
                       void *da, void *db, int64_t B, int64_t T, int64_t H, int64_t N, int64_t L, int dbl,
                       int threads) {
    job_t j = {7, dbl, 1, {r, w, k, v, a, b}, dy, 0, dstate, (void *)ckpt, {dr, dw, dk, dv, da, db}, L, T, H, N};
    return run(&j, B, threads);
}

/* As above for WKV-6; du_part: [B, H, N], the bonus gradient of each (batch, head) pair (the caller sums over B). */
int rwkv_wkv6_backward(const void *r, const void *w, const void *k, const void *v, const void *u, const void *dy,
                       const void *ckpt, void *dstate, void *dr, void *dw, void *dk, void *dv, void *du_part,
                       int64_t B, int64_t T, int64_t H, int64_t N, int64_t L, int dbl, int threads) {
    job_t j = {6, dbl, 1, {r, w, k, v, u, 0}, dy, 0, dstate, (void *)ckpt, {dr, dw, dk, dv, du_part, 0}, L, T, H, N};
    return run(&j, B, threads);
}
