/* WKV-4 (spec 2.2) on CPU: the stable (aa, bb, pp) recurrence per channel, forward and backward.
 *
 * Per token, with w the log decay and u the bonus of the channel (ops/wkv4/naive.py is the specification):
 *     ww = u + k;  p = max(pp, ww);  e1 = e^{pp-p};  e2 = e^{ww-p};  y = (e1 aa + e2 v) / (e1 bb + e2)
 *     ww = w + pp; q = max(ww, k);   f1 = e^{ww-q};  f2 = e^{k-q};   aa = f1 aa + f2 v;  bb = f1 bb + f2;  pp = q
 *
 * The backward is reverse mode through exactly these operations (max sends its gradient to the larger argument, half
 * to each on a tie, as torch.maximum), so it equals autograd of the naive loop to rounding, the gradients of the
 * carried (aa, bb, pp) included. Each batch row first recomputes its forward, keeping the state before every token
 * ([T][3][C], no memory kept between the forward and the backward but the inputs and the initial state), then walks
 * back. Threads over batch rows; the inner loops run over the channels. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for float32 without a library call, so that the channel loops vectorise (libm's expf would keep them
 * scalar): 2^n e^f with n = rint(x / ln 2) and a degree-6 polynomial for e^f, |f| <= ln(2) / 2 (a few ulp from expf);
 * 0 below -87.3 (where expf turns denormal; the loops' exponents are <= 0, and -1e38 stands for an empty state), inf
 * above 88.7, NaN kept. 2^n is applied in two halves so that each is a normal float over the whole range. */
static inline float exp_f32(float x) {
    const float lo = -87.33654f, hi = 88.72283f;
    const float xc = x < lo ? lo : (x > hi ? hi : x);
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    float f = n * -0.693359375f + xc;
    f = n * 2.12194440e-4f + f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + (f + 1.0f);
    const int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1;
    const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    const float y = x < lo ? 0.0f : (x > hi ? INFINITY : p * s1 * s2);
    return x != x ? x : y;
}

/* One token of one row: reads the state (aa, bb, pp) [C], writes y [C] (always: a scratch row where unused) and
 * the next state (which may be the same arrays: each channel reads its entries before writing them). */
#define WKV4_TOKEN(NAME, REAL, EXP)                                                                              \
    static inline void NAME(int64_t C, const REAL *w, const REAL *u, const REAL *k, const REAL *v, const REAL *aa, \
                            const REAL *bb, const REAL *pp, REAL *y, REAL *na, REAL *nb, REAL *np) {             \
        _Pragma("GCC ivdep")                                                                                    \
        for (int64_t c = 0; c < C; c++) {                                                                       \
            const REAL a = aa[c], b = bb[c], s = pp[c], kc = k[c], vc = v[c];                                   \
            REAL ww = u[c] + kc, p = s > ww ? s : ww;                                                           \
            REAL e1 = EXP(s - p), e2 = EXP(ww - p);                                                             \
            y[c] = (e1 * a + e2 * vc) / (e1 * b + e2);                                                          \
            ww = w[c] + s;                                                                                      \
            p = ww > kc ? ww : kc;                                                                              \
            e1 = EXP(ww - p), e2 = EXP(kc - p);                                                                 \
            na[c] = e1 * a + e2 * vc, nb[c] = e1 * b + e2, np[c] = p;                                           \
        }                                                                                                       \
    }

/* Forward: k, v, out [B, T, C]; aa, bb, pp [B, C], the initial state in, the final state out. */
#define WKV4_FWD(NAME, TOKEN, REAL)                                                                             \
    static int NAME(const REAL *w, const REAL *u, const REAL *k, const REAL *v, REAL *out, REAL *aa, REAL *bb,  \
                    REAL *pp, int64_t B, int64_t T, int64_t C, int threads) {                                   \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                      \
        for (int64_t b = 0; b < B; b++) {                                                                       \
            REAL *a = aa + b * C, *bs = bb + b * C, *p = pp + b * C;                                            \
            for (int64_t t = 0; t < T; t++) {                                                                   \
                const int64_t o = (b * T + t) * C;                                                              \
                TOKEN(C, w, u, k + o, v + o, a, bs, p, out + o, a, bs, p);                                      \
            }                                                                                                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }

/* Backward: dy [B, T, C]; (aa, bb, pp) [B, C] the initial state; (ga, gb, gp) [B, C] the final state's gradient in,
 * the initial state's out; dk, dv [B, T, C]; dw, du [B, C] per row (the caller sums over rows). 1 when out of
 * memory. */
#define WKV4_BWD(NAME, TOKEN, REAL, EXP)                                                                        \
    static int NAME(const REAL *w, const REAL *u, const REAL *k, const REAL *v, const REAL *dy, const REAL *aa,  \
                    const REAL *bb, const REAL *pp, REAL *ga, REAL *gb, REAL *gp, REAL *dk, REAL *dv, REAL *dw,  \
                    REAL *du, int64_t B, int64_t T, int64_t C, int threads) {                                   \
        int err = 0;                                                                                            \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(| : err)")                    \
        for (int64_t b = 0; b < B; b++) {                                                                       \
            REAL *st = malloc(sizeof(REAL) * (3 * C * (T + 1) + C)), *scratch = st + 3 * C * (T + 1);           \
            if (!st) {                                                                                          \
                err = 1;                                                                                        \
                continue;                                                                                       \
            }                                                                                                   \
            memcpy(st, aa + b * C, sizeof(REAL) * C);                                                           \
            memcpy(st + C, bb + b * C, sizeof(REAL) * C);                                                       \
            memcpy(st + 2 * C, pp + b * C, sizeof(REAL) * C);                                                   \
            for (int64_t t = 0; t < T; t++) {                                                                   \
                const int64_t o = (b * T + t) * C;                                                              \
                REAL *s = st + 3 * C * t, *n = s + 3 * C;                                                       \
                TOKEN(C, w, u, k + o, v + o, s, s + C, s + 2 * C, scratch, n, n + C, n + 2 * C);                \
            }                                                                                                   \
            REAL *Ga = ga + b * C, *Gb = gb + b * C, *Gp = gp + b * C, *Gw = dw + b * C, *Gu = du + b * C;      \
            memset(Gw, 0, sizeof(REAL) * C);                                                                    \
            memset(Gu, 0, sizeof(REAL) * C);                                                                    \
            for (int64_t t = T - 1; t >= 0; t--) {                                                              \
                const int64_t o = (b * T + t) * C;                                                              \
                const REAL *s = st + 3 * C * t;                                                                 \
                _Pragma("GCC ivdep")                                                                            \
                for (int64_t c = 0; c < C; c++) {                                                               \
                    const REAL a = s[c], bs = s[C + c], ps = s[2 * C + c], kc = k[o + c], vc = v[o + c];        \
                    const REAL gA = Ga[c], gB = Gb[c], gP = Gp[c], g = dy[o + c];                               \
                    /* the state update: aa' = f1 aa + f2 v, bb' = f1 bb + f2, pp' = q = max(w + pp, k) */     \
                    const REAL ww2 = w[c] + ps, q = ww2 > kc ? ww2 : kc;                                        \
                    const REAL f1 = EXP(ww2 - q), f2 = EXP(kc - q);                                             \
                    const REAL gf1 = a * gA + bs * gB, gf2 = vc * gA + gB;                                      \
                    const REAL gq = gP - f1 * gf1 - f2 * gf2;                                                   \
                    const REAL sq = ww2 > kc ? 1 : (ww2 == kc ? (REAL)0.5 : 0);                                 \
                    const REAL gww2 = f1 * gf1 + sq * gq;                                                       \
                    REAL gk = f2 * gf2 + (1 - sq) * gq, gv = f2 * gA;                                           \
                    REAL na = f1 * gA, nb = f1 * gB, np = gww2;                                                 \
                    Gw[c] += gww2;                                                                              \
                    /* the output: y = (e1 aa + e2 v) / (e1 bb + e2), p = max(pp, u + k) */                     \
                    const REAL ww = u[c] + kc, p = ps > ww ? ps : ww;                                           \
                    const REAL e1 = EXP(ps - p), e2 = EXP(ww - p);                                              \
                    const REAL num = e1 * a + e2 * vc, den = e1 * bs + e2;                                      \
                    const REAL gnum = g / den, gden = -g * num / (den * den);                                   \
                    const REAL ge1 = a * gnum + bs * gden, ge2 = vc * gnum + gden;                              \
                    const REAL gpm = -e1 * ge1 - e2 * ge2;                                                      \
                    const REAL sp = ps > ww ? 1 : (ps == ww ? (REAL)0.5 : 0);                                   \
                    const REAL gww = e2 * ge2 + (1 - sp) * gpm;                                                 \
                    na += e1 * gnum, nb += e1 * gden, np += e1 * ge1 + sp * gpm;                                \
                    gv += e2 * gnum, gk += gww;                                                                 \
                    Gu[c] += gww;                                                                               \
                    dk[o + c] = gk, dv[o + c] = gv;                                                             \
                    Ga[c] = na, Gb[c] = nb, Gp[c] = np;                                                         \
                }                                                                                               \
            }                                                                                                   \
            free(st);                                                                                           \
        }                                                                                                       \
        return err;                                                                                             \
    }

WKV4_TOKEN(wkv4_token_f32, float, exp_f32)
WKV4_TOKEN(wkv4_token_f64, double, exp)
WKV4_FWD(wkv4_fwd_f32, wkv4_token_f32, float)
WKV4_FWD(wkv4_fwd_f64, wkv4_token_f64, double)
WKV4_BWD(wkv4_bwd_f32, wkv4_token_f32, float, exp_f32)
WKV4_BWD(wkv4_bwd_f64, wkv4_token_f64, double, exp)

int rwkv_wkv4_forward(const void *w, const void *u, const void *k, const void *v, void *out, void *aa, void *bb,
                      void *pp, int64_t B, int64_t T, int64_t C, int f64, int threads) {
    if (f64)
        return wkv4_fwd_f64(w, u, k, v, out, aa, bb, pp, B, T, C, threads);
    return wkv4_fwd_f32(w, u, k, v, out, aa, bb, pp, B, T, C, threads);
}

int rwkv_wkv4_backward(const void *w, const void *u, const void *k, const void *v, const void *dy, const void *aa,
                       const void *bb, const void *pp, void *ga, void *gb, void *gp, void *dk, void *dv, void *dw,
                       void *du, int64_t B, int64_t T, int64_t C, int f64, int threads) {
    if (f64)
        return wkv4_bwd_f64(w, u, k, v, dy, aa, bb, pp, ga, gb, gp, dk, dv, dw, du, B, T, C, threads);
    return wkv4_bwd_f32(w, u, k, v, dy, aa, bb, pp, ga, gb, gp, dk, dv, dw, du, B, T, C, threads);
}
