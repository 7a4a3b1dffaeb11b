/* Fused CPU forward kernels of the WKV recurrences (rwkv_torch.ops.cpu_kernel compiles and loads this file).
 *
 * The naive spec loop of ops/wkv7/naive.py and ops/wkv6/naive.py, one (batch, head) pair per work item, the state
 * held in cache for the whole sequence. Forward only (inference and prefill); training uses the chunked form.
 * Inputs r, w, k, v, a, b: [B, T, H, N] contiguous, all of one type (float or double); u: [H, N]; state: [B, H, N, N],
 * read as the initial state and overwritten with the final one; out: [B, T, H, N].
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
                    const REAL *bb, REAL *out, REAL *S, int64_t T, int64_t H, int64_t n, int64_t b,        \
                    int64_t h) {                                                                            \
        const int64_t N = NFIXED ? NFIXED : n;                                                              \
        REAL *buf = (REAL *)malloc(sizeof(REAL) * (N * N + 2 * N));                                         \
        if (!buf) return 1;                                                                                 \
        REAL *ST = buf, *sa = buf + N * N, *y = sa + N;                                                     \
        for (int64_t i = 0; i < N; i++)                                                                     \
            for (int64_t j = 0; j < N; j++) ST[j * N + i] = S[i * N + j];                                   \
        for (int64_t t = 0; t < T; t++) {                                                                   \
            const int64_t o = ((b * T + t) * H + h) * N;                                                    \
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
                    REAL *out, REAL *S, int64_t T, int64_t H, int64_t n, int64_t b, int64_t h) {            \
        const int64_t N = NFIXED ? NFIXED : n;                                                              \
        REAL *y = (REAL *)malloc(sizeof(REAL) * N);                                                         \
        if (!y) return 1;                                                                                   \
        const REAL *uh = u + h * N;                                                                         \
        for (int64_t t = 0; t < T; t++) {                                                                   \
            const int64_t o = ((b * T + t) * H + h) * N;                                                    \
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

WKV7_HEAD(wkv7_f32, f32, expf, 0)
WKV7_HEAD(wkv7_f32_n64, f32, expf, 64)
WKV7_HEAD(wkv7_f64, f64, exp, 0)
WKV6_HEAD(wkv6_f32, f32, expf, 0)
WKV6_HEAD(wkv6_f32_n64, f32, expf, 64)
WKV6_HEAD(wkv6_f64, f64, exp, 0)

typedef struct {
    int version, dbl;
    const void *r, *w, *k, *v, *a, *b;  /* a, b: WKV-7 only; a is u for WKV-6 */
    void *out, *S;
    int64_t T, H, N, lo, hi;
    int err;
} job_t;

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t NN = j->N * j->N;
    for (int64_t x = j->lo; x < j->hi && !j->err; x++) {
        const int64_t b = x / j->H, h = x % j->H;
        if (j->version == 7) {
            if (j->dbl)
                j->err = wkv7_f64(j->r, j->w, j->k, j->v, j->a, j->b, j->out, (f64 *)j->S + x * NN, j->T, j->H,
                                  j->N, b, h);
            else if (j->N == 64)
                j->err = wkv7_f32_n64(j->r, j->w, j->k, j->v, j->a, j->b, j->out, (f32 *)j->S + x * NN, j->T,
                                      j->H, j->N, b, h);
            else
                j->err = wkv7_f32(j->r, j->w, j->k, j->v, j->a, j->b, j->out, (f32 *)j->S + x * NN, j->T, j->H,
                                  j->N, b, h);
        } else {
            if (j->dbl)
                j->err = wkv6_f64(j->r, j->w, j->k, j->v, j->a, j->out, (f64 *)j->S + x * NN, j->T, j->H, j->N, b, h);
            else if (j->N == 64)
                j->err = wkv6_f32_n64(j->r, j->w, j->k, j->v, j->a, j->out, (f32 *)j->S + x * NN, j->T, j->H, j->N,
                                      b, h);
            else
                j->err = wkv6_f32(j->r, j->w, j->k, j->v, j->a, j->out, (f32 *)j->S + x * NN, j->T, j->H, j->N, b, h);
        }
    }
    return 0;
}

#define MAX_THREADS 256

/* Splits the B*H (batch, head) pairs over up to `threads` threads. Returns 0 on success.
 * Built with OpenMP (-fopenmp), the loop runs on the OpenMP runtime already loaded by PyTorch (same libgomp), so the
 * kernel shares PyTorch's worker threads instead of competing with them for the cores; otherwise on pthreads. */
static int run(job_t proto, int64_t B, int threads) {
    const int64_t work = B * proto.H;
    if (work <= 0) return 0;
    if (threads > work) threads = (int)work;
#ifdef _OPENMP
    if (threads < 1) threads = 1;
    int err = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : err)
    for (int64_t x = 0; x < work; x++) {
        job_t j = proto;
        j.lo = x;
        j.hi = x + 1;
        run_job(&j);
        err |= j.err;
    }
    return err;
#else
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        jobs[i] = proto;
        jobs[i].lo = work * i / threads;
        jobs[i].hi = work * (i + 1) / threads;
        started[i] = 0;
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tids[i], 0, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    int err = jobs[0].err;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tids[i], 0);
        else run_job(&jobs[i]);  /* no thread: do its share here */
        err |= jobs[i].err;
    }
    return err;
#endif
}

int rwkv_wkv7_forward(const void *r, const void *w, const void *k, const void *v, const void *a, const void *b,
                      void *out, void *state, int64_t B, int64_t T, int64_t H, int64_t N, int dbl, int threads) {
    job_t p = {7, dbl, r, w, k, v, a, b, out, state, T, H, N, 0, 0, 0};
    return run(p, B, threads);
}

int rwkv_wkv6_forward(const void *r, const void *w, const void *k, const void *v, const void *u, void *out,
                      void *state, int64_t B, int64_t T, int64_t H, int64_t N, int dbl, int threads) {
    job_t p = {6, dbl, r, w, k, v, u, 0, out, state, T, H, N, 0, 0, 0};
    return run(p, B, threads);
}
