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

/* 32-byte vectors (GCC/clang vector extensions; the compiler splits them where the CPU has narrower ones), loaded and
 * stored unaligned. */
typedef float vf32 __attribute__((vector_size(32), aligned(4)));
typedef double vf64 __attribute__((vector_size(32), aligned(8)));

/* Per row, per two vectors of channels: dx and dxx stay in registers over the n lerps, so each d_i is read once and
 * only the dmu partial sums go back to memory; a scalar loop takes the channels left over. */
#define MIX_BACK(NAME, REAL, VEC)                                                                               \
    static int NAME(int n, int64_t R, int64_t C, const REAL *const *d, const REAL *const *mu, const REAL *xx,   \
                    REAL *dx, REAL *dxx, REAL *part, int threads) {                                             \
        const int64_t blocks = (R + MIX_ROWS - 1) / MIX_ROWS, L = sizeof(VEC) / sizeof(REAL);                   \
        const int64_t CV = C - C % (2 * L);                                                                     \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                            \
            REAL *pb = part + blk * n * C;                                                                      \
            memset(pb, 0, sizeof(REAL) * n * C);                                                                \
            const int64_t end = (blk + 1) * MIX_ROWS < R ? (blk + 1) * MIX_ROWS : R;                            \
            for (int64_t r = blk * MIX_ROWS; r < end; r++) {                                                    \
                const REAL *xr = xx + r * C;                                                                    \
                for (int64_t c = 0; c < CV; c += 2 * L) {                                                       \
                    const VEC x0 = *(const VEC *)(xr + c), x1 = *(const VEC *)(xr + c + L);                     \
                    VEC g0 = {0}, g1 = {0}, h0 = {0}, h1 = {0};                                                 \
                    for (int i = 0; i < n; i++) {                                                               \
                        const REAL *di = d[i] + r * C + c, *mi = mu[i] + c;                                     \
                        const VEC v0 = *(const VEC *)di, v1 = *(const VEC *)(di + L);                           \
                        VEC *p0 = (VEC *)(pb + i * C + c), *p1 = (VEC *)(pb + i * C + c + L);                   \
                        g0 += v0, g1 += v1;                                                                     \
                        h0 += v0 * *(const VEC *)mi, h1 += v1 * *(const VEC *)(mi + L);                         \
                        *p0 += v0 * x0, *p1 += v1 * x1;                                                         \
                    }                                                                                           \
                    *(VEC *)(dx + r * C + c) = g0 - h0, *(VEC *)(dx + r * C + c + L) = g1 - h1;                 \
                    *(VEC *)(dxx + r * C + c) = h0, *(VEC *)(dxx + r * C + c + L) = h1;                         \
                }                                                                                               \
                for (int64_t c = CV; c < C; c++) {                                                              \
                    REAL g = 0, h = 0;                                                                          \
                    for (int i = 0; i < n; i++) {                                                               \
                        const REAL v = d[i][r * C + c];                                                         \
                        g += v, h += v * mu[i][c];                                                              \
                        pb[i * C + c] += v * xr[c];                                                             \
                    }                                                                                           \
                    dx[r * C + c] = g - h, dxx[r * C + c] = h;                                                  \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }

MIX_BACK(mix_back_f32, float, vf32)
MIX_BACK(mix_back_f64, double, vf64)

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

/* The elementwise half of RWKV-6's data-dependent mix backward (ops/mix.py, data_lerp_linear), one pass.
 *
 * The forward feeds J lerps x + xx * (mu_j + m_j) (m_j [R, C] from the mixing LoRA, xx = x_prev - x) into J
 * projections. Given each projection's input gradient d_j = g_j @ W_j ([R, C] rows), per element
 *     dxx = sum_j d_j (mu_j + m_j),   dx = sum_j d_j - dxx,   dm_j = d_j xx (written over d_j: m_j's gradient),
 *     m_j := x + xx (mu_j + m_j)      (written over m_j: the lerp, the input of W_j's weight gradient),
 * and dmu_j = sum over rows of dm_j, over fixed blocks of MIX_ROWS rows into part ([blocks, J, C]) as in
 * rwkv_mix_backward: the results do not depend on the thread count. */
#define DATA_MIX_BACK(NAME, REAL)                                                                              \
    static void NAME(int J, int64_t R, int64_t C, REAL *const *d, REAL *const *m, const REAL *const *mu,       \
                     const REAL *x, const REAL *xx, REAL *dx, REAL *dxx, REAL *part, int threads) {            \
        const int64_t blocks = (R + MIX_ROWS - 1) / MIX_ROWS;                                                  \
        (void)threads;                                                                                         \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                      \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                           \
            REAL *pb = part + blk * J * C;                                                                     \
            memset(pb, 0, sizeof(REAL) * J * C);                                                               \
            const int64_t end = (blk + 1) * MIX_ROWS < R ? (blk + 1) * MIX_ROWS : R;                           \
            for (int64_t r = blk * MIX_ROWS; r < end; r++) {                                                   \
                const REAL *restrict xr = x + r * C, *restrict xxr = xx + r * C;                               \
                REAL *restrict g = dx + r * C, *restrict h = dxx + r * C;                                      \
                for (int j = 0; j < J; j++) {                                                                  \
                    REAL *restrict dj = d[j] + r * C, *restrict mj = m[j] + r * C, *restrict pj = pb + j * C;  \
                    const REAL *restrict uj = mu[j];                                                           \
                    if (j == 0) {                                                                              \
                        for (int64_t c = 0; c < C; c++) {                                                      \
                            const REAL v = dj[c], mm = uj[c] + mj[c], dm = v * xxr[c];                         \
                            g[c] = v, h[c] = v * mm, dj[c] = dm, pj[c] += dm, mj[c] = xr[c] + xxr[c] * mm;     \
                        }                                                                                      \
                    } else {                                                                                   \
                        for (int64_t c = 0; c < C; c++) {                                                      \
                            const REAL v = dj[c], mm = uj[c] + mj[c], dm = v * xxr[c];                         \
                            g[c] += v, h[c] += v * mm, dj[c] = dm, pj[c] += dm, mj[c] = xr[c] + xxr[c] * mm;   \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
                for (int64_t c = 0; c < C; c++) g[c] -= h[c];                                                  \
            }                                                                                                  \
        }                                                                                                      \
    }

DATA_MIX_BACK(data_mix_back_f32, float)
DATA_MIX_BACK(data_mix_back_f64, double)

/* d, m: J pointers each to [R, C] rows, overwritten (see above); mu: J pointers to [C]; x, xx: [R, C]; outputs dx,
 * dxx [R, C], part [blocks, J, C] (blocks = rwkv_mix_blocks(R)). */
void rwkv_data_mix_backward(int J, int64_t R, int64_t C, void *const *d, void *const *m, const void *const *mu,
                            const void *x, const void *xx, void *dx, void *dxx, void *part, int f64, int threads) {
    if (f64)
        data_mix_back_f64(J, R, C, (double *const *)d, (double *const *)m, (const double *const *)mu, x, xx, dx, dxx,
                          part, threads);
    else
        data_mix_back_f32(J, R, C, (float *const *)d, (float *const *)m, (const float *const *)mu, x, xx, dx, dxx,
                          part, threads);
}
