/* The elementwise backwards of the time mix's training form (ops/gated_output.py, ops/wkv7/fused_inputs.py), one pass
 * per row each.
 *
 * gated_output's, forward per row (token) and head (N channels): yn = (y - mean(y)) * rstd, rstd = 1 / sqrt(var(y) + eps);
 *     z = yn * ln_w + ln_b + bonus * v,  bonus = sum_head r * k * r_k (RWKV-7; none in RWKV-5/6);  out = (z * g) @ W_out^T.
 * Given dzg = d_out @ W_out ([R, C]), the backward recomputes the head's statistics, yn, bonus and z, and writes
 *     zg = z * g (the output projection's input, for its weight gradient), dg = dzg * z, dz = dzg * g,
 *     dv = dz * bonus, d_bonus = sum_head dz * v, dr = d_bonus * r_k * k, dk = d_bonus * r_k * r,
 *     dy = rstd * (dyn - mean(dyn) - yn * mean(dyn * yn)) with dyn = dz * ln_w (the layer norm's backward),
 * and the per-channel sums dr_k = sum r * k * d_bonus, dln_w = sum dz * yn, dln_b = sum dz, each over fixed blocks of
 * TIME_MIX_ROWS rows into its own row of `part` ([blocks, 3, C]), which the caller adds up in block order: the results
 * do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TIME_MIX_ROWS 64

#define GATED_BACK(NAME, REAL, BONUS)                                                                                        \
    static int NAME(int64_t R, int64_t H, int64_t N, const REAL *restrict dzg, const REAL *restrict y,                \
                    const REAL *restrict r, const REAL *restrict k, const REAL *restrict v, const REAL *restrict g,   \
                    const REAL *restrict r_k, const REAL *restrict ln_w, const REAL *restrict ln_b, double eps,       \
                    REAL *restrict dy, REAL *restrict dr, REAL *restrict dk, REAL *restrict dv, REAL *restrict dg,    \
                    REAL *restrict zg, REAL *restrict part, int threads) {                                            \
        const int64_t C = H * N, blocks = (R + TIME_MIX_ROWS - 1) / TIME_MIX_ROWS;                                    \
        int err = 0;                                                                                                  \
        (void)threads;                                                                                                \
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(| : err)")                          \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                                  \
            REAL *restrict prk = part + blk * 3 * C, *restrict pw = prk + C, *restrict pb = pw + C;                   \
            REAL *buf = malloc(sizeof(REAL) * 2 * N);                                                                 \
            if (!buf) {                                                                                               \
                err = 1;                                                                                              \
                continue;                                                                                             \
            }                                                                                                         \
            REAL *restrict yn = buf, *restrict dyn = buf + N;                                                         \
            memset(prk, 0, sizeof(REAL) * 3 * C);                                                                     \
            const int64_t end = (blk + 1) * TIME_MIX_ROWS < R ? (blk + 1) * TIME_MIX_ROWS : R;                        \
            for (int64_t row = blk * TIME_MIX_ROWS; row < end; row++) {                                               \
                for (int64_t h = 0; h < H; h++) {                                                                     \
                    const int64_t o = row * C + h * N, c0 = h * N;                                                    \
                    REAL s = 0, ss = 0;                                                                               \
                    for (int64_t n = 0; n < N; n++) s += y[o + n];                                                    \
                    const REAL m = s / N;                                                                             \
                    for (int64_t n = 0; n < N; n++) ss += (y[o + n] - m) * (y[o + n] - m);                            \
                    const REAL rstd = (REAL)(1 / sqrt((double)ss / N + eps));                                         \
                    REAL bonus = 0, d_bonus = 0, sdyn = 0, sdyn_yn = 0;                                               \
                    if (BONUS)                                                                                        \
                        for (int64_t n = 0; n < N; n++) bonus += r[o + n] * k[o + n] * r_k[c0 + n];                   \
                    for (int64_t n = 0; n < N; n++) {                                                                 \
                        const REAL x = (y[o + n] - m) * rstd;                                                         \
                        const REAL z = BONUS ? x * ln_w[c0 + n] + ln_b[c0 + n] + bonus * v[o + n]                     \
                                             : x * ln_w[c0 + n] + ln_b[c0 + n];                                       \
                        const REAL d = dzg[o + n], dz = d * g[o + n], dx = dz * ln_w[c0 + n];                         \
                        zg[o + n] = z * g[o + n];                                                                     \
                        dg[o + n] = d * z;                                                                            \
                        if (BONUS) {                                                                                  \
                            dv[o + n] = dz * bonus;                                                                   \
                            d_bonus += dz * v[o + n];                                                                 \
                        }                                                                                             \
                        pw[c0 + n] += dz * x;                                                                         \
                        pb[c0 + n] += dz;                                                                             \
                        yn[n] = x, dyn[n] = dx;                                                                       \
                        sdyn += dx, sdyn_yn += dx * x;                                                                \
                    }                                                                                                 \
                    const REAL a = sdyn / N, b = sdyn_yn / N;                                                         \
                    for (int64_t n = 0; n < N; n++) dy[o + n] = rstd * (dyn[n] - a - yn[n] * b);                      \
                    if (BONUS)                                                                                        \
                        for (int64_t n = 0; n < N; n++) {                                                             \
                            const REAL t = d_bonus * r_k[c0 + n];                                                     \
                            dr[o + n] = t * k[o + n];                                                                 \
                            dk[o + n] = t * r[o + n];                                                                 \
                            prk[c0 + n] += r[o + n] * k[o + n] * d_bonus;                                             \
                        }                                                                                             \
                }                                                                                                     \
            }                                                                                                         \
            free(buf);                                                                                                \
        }                                                                                                             \
        return err;                                                                                                   \
    }

GATED_BACK(gated_back_f32, float, 1)
GATED_BACK(gated_back_f64, double, 1)
GATED_BACK(gated_back_plain_f32, float, 0)
GATED_BACK(gated_back_plain_f64, double, 0)

int64_t rwkv_time_mix_blocks(int64_t R) { return (R + TIME_MIX_ROWS - 1) / TIME_MIX_ROWS; }

/* dzg, y, r, k, v, g: [R, H * N] contiguous; r_k, ln_w, ln_b: [H * N]; outputs dy, dr, dk, dv, dg, zg: [R, H * N];
 * part: [blocks, 3, H * N] (dr_k, dln_w, dln_b). Without the bonus (RWKV-5/6: r, k, v, r_k and dr, dk, dv NULL) the
 * dr_k row of part stays zero. Returns 1 when out of memory. */
int rwkv_gated_output_backward(int64_t R, int64_t H, int64_t N, const void *const *in, double eps,
                               void *const *out, void *part, int f64, int threads) {
    if (!in[2]) {
        if (f64)
            return gated_back_plain_f64(R, H, N, in[0], in[1], NULL, NULL, NULL, in[5], NULL, in[7], in[8], eps,
                                        out[0], NULL, NULL, NULL, out[4], out[5], part, threads);
        return gated_back_plain_f32(R, H, N, in[0], in[1], NULL, NULL, NULL, in[5], NULL, in[7], in[8], eps, out[0],
                                    NULL, NULL, NULL, out[4], out[5], part, threads);
    }
    if (f64)
        return gated_back_f64(R, H, N, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], eps, out[0],
                              out[1], out[2], out[3], out[4], out[5], part, threads);
    return gated_back_f32(R, H, N, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], eps, out[0],
                          out[1], out[2], out[3], out[4], out[5], part, threads);
}

/* The elementwise backward of RWKV-7's WKV inputs (ops/wkv7/fused_inputs.py, wkv_inputs). Forward, per row and head:
 *     w = -s sigmoid(w_raw), a = sigmoid(a_raw), k = k0 (1 + (a - 1) k_a),
 *     kk = kh / max(|kh|, eps) with kh = k0 k_k over the head's N channels, outputs (w, k, -kk, kk a).
 * Given the four output gradients, writes
 *     dw_raw = dw w (1 + w / s), dk0 = dk (1 + (a - 1) k_a) + dkh k_k, da_raw = (db kk + dk k0 k_a) a (1 - a),
 *     dkh = (dkk - [|kh| > eps] kk <dkk, kk>) / max(|kh|, eps) with dkk = db a - d(-kk),
 * and the per-channel sums dk_k = sum dkh k0, dk_a = sum dk k0 (a - 1) over fixed row blocks into part
 * ([blocks, 2, C]), added up by the caller in block order. */
#define INPUTS_BACK(NAME, REAL)                                                                                       \
    static int NAME(int64_t R, int64_t H, int64_t N, const REAL *restrict dw, const REAL *restrict dk,                \
                    const REAL *restrict dmkk, const REAL *restrict db, const REAL *restrict k0,                      \
                    const REAL *restrict a, const REAL *restrict norm, const REAL *restrict w,                        \
                    const REAL *restrict mkk, const REAL *restrict k_k, const REAL *restrict k_a, double s,           \
                    double eps, REAL *restrict dk0, REAL *restrict dw_raw, REAL *restrict da_raw,                     \
                    REAL *restrict part, int threads) {                                                               \
        const int64_t C = H * N, blocks = (R + TIME_MIX_ROWS - 1) / TIME_MIX_ROWS;                                    \
        const REAL inv_s = (REAL)(1 / s);                                                                             \
        (void)threads;                                                                                                \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                             \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                                  \
            REAL *restrict pkk = part + blk * 2 * C, *restrict pka = pkk + C;                                         \
            memset(pkk, 0, sizeof(REAL) * 2 * C);                                                                     \
            const int64_t end = (blk + 1) * TIME_MIX_ROWS < R ? (blk + 1) * TIME_MIX_ROWS : R;                        \
            for (int64_t row = blk * TIME_MIX_ROWS; row < end; row++) {                                               \
                for (int64_t h = 0; h < H; h++) {                                                                     \
                    const int64_t o = row * C + h * N, c0 = h * N;                                                    \
                    const REAL nrm = norm[row * H + h];                                                               \
                    REAL proj = 0;                                                                                    \
                    for (int64_t n = 0; n < N; n++) proj += (db[o + n] * a[o + n] - dmkk[o + n]) * -mkk[o + n];       \
                    const REAL p = nrm > eps ? proj : 0, inv = 1 / (nrm > eps ? nrm : (REAL)eps);                     \
                    for (int64_t n = 0; n < N; n++) {                                                                 \
                        const REAL an = a[o + n], kk = -mkk[o + n], kn = k0[o + n], dkn = dk[o + n];                  \
                        const REAL wn = w[o + n], ka = k_a[c0 + n];                                                   \
                        const REAL dkh = (db[o + n] * an - dmkk[o + n] - kk * p) * inv;                               \
                        dk0[o + n] = dkn * (1 - ka + an * ka) + dkh * k_k[c0 + n];                                    \
                        dw_raw[o + n] = (wn * inv_s + 1) * wn * dw[o + n];                                            \
                        da_raw[o + n] = (db[o + n] * kk + dkn * kn * ka) * (an * (1 - an));                           \
                        pkk[c0 + n] += dkh * kn;                                                                      \
                        pka[c0 + n] += dkn * kn * (an - 1);                                                           \
                    }                                                                                                 \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        return 0;                                                                                                     \
    }

INPUTS_BACK(inputs_back_f32, float)
INPUTS_BACK(inputs_back_f64, double)

/* in: dw, dk, d(-kk), db, k0, a, norm ([R, H]), w, -kk ([R, H * N] unless noted), k_k, k_a ([H * N]); out: dk0,
 * dw_raw, da_raw ([R, H * N]); part: [blocks, 2, H * N] (dk_k, dk_a); s: the decay scale (w = -s sigmoid(w_raw)). */
int rwkv_wkv_inputs_backward(int64_t R, int64_t H, int64_t N, const void *const *in, double s, double eps,
                             void *const *out, void *part, int f64, int threads) {
    if (f64)
        return inputs_back_f64(R, H, N, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9], in[10],
                               s, eps, out[0], out[1], out[2], part, threads);
    return inputs_back_f32(R, H, N, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9], in[10], s,
                           eps, out[0], out[1], out[2], part, threads);
}
