/* One token through every RWKV-7 block in one call (rwkv_torch.decode.c_step drives it), fp32, eval semantics.
 *
 * The math of layers/rwkv7.py's TimeMix and ChannelMix at T = 1 over decode.weights.RWKV7LayerWeights (the
 * stacked, zero-padded LoRAs with the gate rewritten as tanh(u/2) @ (g2/2) + sum(g2/2)). Embedding, ln0, ln_out and
 * the head stay in PyTorch. One OpenMP team runs the whole step: the large matrix-vector products are split by
 * output rows, the LoRAs one per thread, the WKV state update one (batch, head) pair per work item, and the small
 * elementwise passes on one thread; every weight is read once per token for the whole batch.
 *
 * Per layer, params[l * NP + P_*] (all float32, contiguous, layouts of RWKV7LayerWeights):
 *   ln1/ln2 weight and bias [C]; mus [6, C] (order r, k, v, a, w, g); lora first [n, C, D], second [n, D, C],
 *   bias [n, C] (order (v,) a, w, g: n = 4, or 3 in layer 0); 1 - k_a, k_a, k_k, r_k [C]; W_r, W_k, W_v, W_o [C, C]
 *   (out x in); ln_x weight and bias [C]; ffn x_k [C], key [F, C], value [C, F].
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
       P_WR, P_WK, P_WV, P_WO, P_LNXW, P_LNXB, P_FXK, P_FKEY, P_FVAL, NP };

const char *rwkv7_step_fields(void) {
    return "ln1_w,ln1_b,ln2_w,ln2_b,mus,lora_first,lora_second,lora_bias,one_minus_k_a,k_a,k_k,r_k,"
           "w_r,w_k,w_v,w_o,ln_x_w,ln_x_b,ffn_x_k,ffn_key,ffn_value";
}

#define DECAY_SCALE 0.60653065971263342f /* exp(-0.5) */

static float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

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

/* Y[b, o] = (acc ? Y[b, o] : 0) + sum_i W[o, i] X[b, i] for the rows o of this thread's share. Four rows at a time
 * (four independent sums), the batch inside, so each weight row is read once for all rows of X. */
static void gemv_rows(const float *restrict W, const float *restrict X, float *restrict Y, int64_t B, int64_t out,
                      int64_t in, int acc) {
#pragma omp for schedule(static)
    for (int64_t o4 = 0; o4 < (out + 3) / 4; o4++) {
        const int64_t o = o4 * 4, m = out - o < 4 ? out - o : 4;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = X + b * in;
            float *yb = Y + b * out + o;
            if (m == 4) {
                const float *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                for (int64_t i = 0; i < in; i++) {
                    const float xi = xb[i];
                    s0 += w0[i] * xi;
                    s1 += w1[i] * xi;
                    s2 += w2[i] * xi;
                    s3 += w3[i] * xi;
                }
                if (acc) yb[0] += s0, yb[1] += s1, yb[2] += s2, yb[3] += s3;
                else yb[0] = s0, yb[1] = s1, yb[2] = s2, yb[3] = s3;
            } else {
                for (int64_t j = 0; j < m; j++) {
                    const float *wj = W + (o + j) * in;
                    float s = 0;
                    for (int64_t i = 0; i < in; i++) s += wj[i] * xb[i];
                    yb[j] = acc ? yb[j] + s : s;
                }
            }
        }
    }
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

/* One head's state update and read-out: sa = S kk; S = S diag(decay) - sa bᵀ + v kᵀ; y = S r. */
static void wkv_head(const float *Sin, float *S, const float *restrict r, const float *restrict dec,
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

typedef struct {
    float *xa, *xs, *r, *k, *v, *z, *lo, *y, *vfirst, *xf, *kf, *kk, *bv, *dec;
} scratch_t;

int rwkv7_blocks_step(int64_t L, int64_t B, int64_t C, int64_t H, int64_t F, int64_t D, const void *const *params,
                      const int64_t *n_lora, const double *eps, float *x, float *const *sa_in, float *const *sf_in,
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
        gemv_rows(P[P_WR], s.xs, s.r, B, C, C, 0);
        gemv_rows(P[P_WK], s.xs + BC, s.k, B, C, C, 0);
        gemv_rows(P[P_WV], s.xs + 2 * BC, s.v, B, C, C, 0);
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
                s.dec[j] = expf(-DECAY_SCALE * sigmoidf_(lw[j]));
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
        gemv_rows(P[P_WO], s.y, x, B, C, C, 1);
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
        gemv_rows(P[P_FKEY], s.xs, s.kf, B, F, C, 0);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < B * F; j++) {
            const float t = s.kf[j] > 0 ? s.kf[j] : 0;
            s.kf[j] = t * t;
        }
        gemv_rows(P[P_FVAL], s.kf, x, B, C, F, 1);
    }
    free(buf);
    return 0;
}
