/* The elementwise half of a token-shift mix's backward (ops/mix.py, shift_mix_linear), one pass over its inputs.
 *
 * The forward feeds n lerps x + xx * mu_i (xx = x_prev - x) into n projections. Given each projection's input
 * gradient d_i = g_i @ W_i ([R, C] rows), the backward needs
 *     dx  = sum_i d_i - dxx        (the -x inside xx; the x_prev part is token_shift_backward(dxx), done by the caller)
 *     dxx = sum_i d_i * mu_i
 *     dmu_i = sum over rows of d_i * xx
 * With one torch op per term that is about ten passes over [R, C] per lerp; here every d_i is read once.
 *
 * The per-channel sums dmu_i are taken over fixed blocks of MIX_ROWS rows, each block into its own row of `part`
 * ([blocks, n, C]), which the caller adds up in block order: the results do not depend on the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIX_ROWS 64

/* One row of one lerp: restrict parameters, so the compiler vectorises without a run-time overlap check. */
#define MIX_ROW(NAME, REAL)                                                                                     \
    static inline void NAME(int64_t C, const REAL *restrict d, const REAL *restrict mu,                          \
                            const REAL *restrict xx, REAL *restrict dx, REAL *restrict dxx, REAL *restrict dmu) { \
        for (int64_t c = 0; c < C; c++) {                                                                       \
            REAL v = d[c];                                                                                      \
            dx[c] += v;                                                                                         \
            dxx[c] += v * mu[c];                                                                                \
            dmu[c] += v * xx[c];                                                                                \
        }                                                                                                       \
    }

/* Each row is summed into a per-thread buffer, then stored. Returns 1 when out of memory. */
#define MIX_BACK(NAME, ROW, REAL)                                                                               \
    static int NAME(int n, int64_t R, int64_t C, const REAL *const *d, const REAL *const *mu, const REAL *xx,   \
                    REAL *dx, REAL *dxx, REAL *part, int threads) {                                             \
        int64_t blocks = (R + MIX_ROWS - 1) / MIX_ROWS;                                                         \
        int err = 0;                                                                                            \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(| : err)")                    \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                            \
            REAL *pb = part + blk * n * C;                                                                      \
            REAL *gx = malloc(sizeof(REAL) * 2 * C), *gxx = gx + C;                                             \
            if (!gx) {                                                                                          \
                err = 1;                                                                                        \
                continue;                                                                                       \
            }                                                                                                   \
            memset(pb, 0, sizeof(REAL) * n * C);                                                                \
            int64_t end = (blk + 1) * MIX_ROWS < R ? (blk + 1) * MIX_ROWS : R;                                  \
            for (int64_t r = blk * MIX_ROWS; r < end; r++) {                                                    \
                memset(gx, 0, sizeof(REAL) * 2 * C);                                                            \
                for (int i = 0; i < n; i++) ROW(C, d[i] + r * C, mu[i], xx + r * C, gx, gxx, pb + i * C);       \
                for (int64_t c = 0; c < C; c++) {                                                               \
                    dx[r * C + c] = gx[c] - gxx[c];                                                             \
                    dxx[r * C + c] = gxx[c];                                                                    \
                }                                                                                               \
            }                                                                                                   \
            free(gx);                                                                                           \
        }                                                                                                       \
        return err;                                                                                             \
    }

MIX_ROW(mix_row_f32, float)
MIX_ROW(mix_row_f64, double)
MIX_BACK(mix_back_f32, mix_row_f32, float)
MIX_BACK(mix_back_f64, mix_row_f64, double)

int64_t rwkv_mix_blocks(int64_t R) { return (R + MIX_ROWS - 1) / MIX_ROWS; }

/* d, mu: n pointers each ([R, C] and [C], contiguous); xx [R, C]; outputs dx, dxx [R, C],
 * part [blocks, n, C]. */
int rwkv_mix_backward(int n, int64_t R, int64_t C, const void *const *d, const void *const *mu, const void *xx,
                       void *dx, void *dxx, void *part, int f64, int threads) {
    if (f64)
        return mix_back_f64(n, R, C, (const double *const *)d, (const double *const *)mu, xx, dx, dxx, part, threads);
    return mix_back_f32(n, R, C, (const float *const *)d, (const float *const *)mu, xx, dx, dxx, part, threads);
}

/* RWKV's feed-forward activation s = relu(z)^2 (ops/mix.py, squared_relu_linear), one pass over z. With g (the
 * gradient of s, [n]) the backward's pass as well: g *= 2 relu(z), in place, and s recomputed for the weight gradient.
 * relu keeps NaN (z < 0 ? 0 : z), as torch.relu does; the products round as the torch ops' (r * r, g * (2 r)). */
#define SQRELU_BLOCK 16384
#define SQRELU(NAME, REAL)                                                                                       \
    static void NAME(int64_t n, const REAL *restrict z, REAL *restrict s, REAL *restrict g, int threads) {       \
        int64_t blocks = (n + SQRELU_BLOCK - 1) / SQRELU_BLOCK;                                                  \
        (void)threads;                                                                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                             \
            int64_t lo = blk * SQRELU_BLOCK, hi = lo + SQRELU_BLOCK < n ? lo + SQRELU_BLOCK : n;                 \
            if (g) {                                                                                             \
                for (int64_t i = lo; i < hi; i++) {                                                              \
                    REAL r = z[i] < 0 ? 0 : z[i];                                                                \
                    s[i] = r * r;                                                                                \
                    g[i] *= r + r;                                                                               \
                }                                                                                                \
            } else {                                                                                             \
                for (int64_t i = lo; i < hi; i++) {                                                              \
                    REAL r = z[i] < 0 ? 0 : z[i];                                                                \
                    s[i] = r * r;                                                                                \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

SQRELU(sqrelu_f32, float)
SQRELU(sqrelu_f64, double)

/* z, s and g (g may be null): n contiguous elements of one type. */
void rwkv_squared_relu(int64_t n, const void *z, void *s, void *g, int f64, int threads) {
    if (f64) sqrelu_f64(n, z, s, g, threads);
    else sqrelu_f32(n, z, s, g, threads);
}
