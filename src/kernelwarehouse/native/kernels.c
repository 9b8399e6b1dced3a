/* Native CPU kernels of kernelwarehouse, compiled at first use by kernelwarehouse.native.
 *
 * kw_mix_rows: for every output channel c of a warehouse stored output channel first,
 *     out[c, r, :] = sum_j rows[r, j] * cells[c, j, :]          (accumulate = 0)
 *     out[c, r, :] += sum_j rows[r, j] * cells[c, j, :]         (accumulate = 1)
 * The inner dimension (the n warehouse cells) is small, 2 to a few hundred, which general matrix
 * products handle poorly; here a block of rows times four vectors of one channel's cells is kept in
 * registers while the n cells stream through.
 */
#include <stdlib.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64)));   /* 16 floats; the compiler picks the instructions */
enum { LANES = 16, WIDE = 4, MAX_ROWS = 6 };

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* rows_in_block x (width vectors) of the output, width in {1, WIDE}; both constant after inlining */
static inline __attribute__((always_inline)) void block(const int rows_in_block, const int width, const float *rows,
                                                        int n, const float *cells, long cell_stride, float *out,
                                                        long out_stride, int accumulate) {
    vec acc[MAX_ROWS][WIDE];
    for (int r = 0; r < rows_in_block; r++)
        for (int k = 0; k < width; k++)
            acc[r][k] = accumulate ? load(out + r * out_stride + k * LANES) : (vec){0};
    for (int j = 0; j < n; j++) {
        vec cell[WIDE];
        for (int k = 0; k < width; k++) cell[k] = load(cells + j * cell_stride + k * LANES);
        for (int r = 0; r < rows_in_block; r++) {
            const float a = rows[r * n + j];
            for (int k = 0; k < width; k++) acc[r][k] += a * cell[k];
        }
    }
    for (int r = 0; r < rows_in_block; r++)
        for (int k = 0; k < width; k++) store(out + r * out_stride + k * LANES, acc[r][k]);
}

#define BY_ROWS(rows_in_block, ...) switch (rows_in_block) { \
    case 6: block(6, __VA_ARGS__); break; case 5: block(5, __VA_ARGS__); break; \
    case 4: block(4, __VA_ARGS__); break; case 3: block(3, __VA_ARGS__); break; \
    case 2: block(2, __VA_ARGS__); break; default: block(1, __VA_ARGS__); }

static void row_block(int rows_in_block, const float *rows, int n, const float *cells, long cell_stride, long length,
                      float *out, long out_stride, int accumulate) {
    long d = 0;
    for (; d + WIDE * LANES <= length; d += WIDE * LANES)
        BY_ROWS(rows_in_block, WIDE, rows, n, cells + d, cell_stride, out + d, out_stride, accumulate)
    for (; d + LANES <= length; d += LANES)
        BY_ROWS(rows_in_block, 1, rows, n, cells + d, cell_stride, out + d, out_stride, accumulate)
    for (; d < length; d++)
        for (int r = 0; r < rows_in_block; r++) {
            float sum = accumulate ? out[r * out_stride + d] : 0.0f;
            for (int j = 0; j < n; j++) sum += rows[r * n + j] * cells[j * cell_stride + d];
            out[r * out_stride + d] = sum;
        }
}

/* rows: (num_rows, n) contiguous; cells: (channels, n, length), strides (channel_stride, cell_stride, 1);
 * out: (channels, num_rows, length), strides (out_channel_stride, out_row_stride, 1). The threads share
 * out the channels, and with fewer channels than threads also pieces of the length. */
void kw_mix_rows(const float *rows, long num_rows, int n, const float *cells, long channels, long channel_stride,
                 long cell_stride, long length, float *out, long out_channel_stride, long out_row_stride,
                 int accumulate, int threads) {
    const long blocks = (num_rows + MAX_ROWS - 1) / MAX_ROWS;
    const long step = WIDE * LANES;
    long pieces = channels >= threads ? 1 : (2 * threads + channels - 1) / channels;
    long piece = (length / pieces + step - 1) / step * step;
    if (piece < step) piece = step;
    pieces = (length + piece - 1) / piece;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long task = 0; task < channels * pieces; task++) {
        const long c = task / pieces, start = task % pieces * piece;
        const long size = length - start < piece ? length - start : piece;
        long r = 0;
        for (long b = 0; b < blocks; b++) {   /* blocks of near-equal size: 9 rows are 4 + 5, not 6 + 3 */
            const int rows_in_block = (int)((num_rows - r) / (blocks - b));
            row_block(rows_in_block, rows + r * n, n, cells + c * channel_stride + start, cell_stride, size,
                      out + c * out_channel_stride + r * out_row_stride + start, out_row_stride, accumulate);
            r += rows_in_block;
        }
    }
}

/* A block of rows_in_block x cells_in_block dot products of length `length`, added to out (row stride n). */
static inline __attribute__((always_inline)) void dot_block(const int rows_in_block, const int cells_in_block,
                                                            const float *grad, long grad_stride, const float *cells,
                                                            long cell_stride, long length, float *out, int n) {
    vec acc[3][4];
    for (int r = 0; r < rows_in_block; r++)
        for (int j = 0; j < cells_in_block; j++) acc[r][j] = (vec){0};
    long d = 0;
    for (; d + LANES <= length; d += LANES) {
        vec g[3], e[4];
        for (int r = 0; r < rows_in_block; r++) g[r] = load(grad + r * grad_stride + d);
        for (int j = 0; j < cells_in_block; j++) e[j] = load(cells + j * cell_stride + d);
        for (int r = 0; r < rows_in_block; r++)
            for (int j = 0; j < cells_in_block; j++) acc[r][j] += g[r] * e[j];
    }
    for (int r = 0; r < rows_in_block; r++)
        for (int j = 0; j < cells_in_block; j++) {
            float sum = 0.0f;
            for (int k = 0; k < LANES; k++) sum += acc[r][j][k];
            for (long t = d; t < length; t++) sum += grad[r * grad_stride + t] * cells[j * cell_stride + t];
            out[r * n + j] += sum;
        }
}

#define BY_CELLS(rows_in_block, cells_in_block, ...) switch (cells_in_block) { \
    case 4: dot_block(rows_in_block, 4, __VA_ARGS__); break; case 3: dot_block(rows_in_block, 3, __VA_ARGS__); break; \
    case 2: dot_block(rows_in_block, 2, __VA_ARGS__); break; default: dot_block(rows_in_block, 1, __VA_ARGS__); }

/* The gradient of kw_mix_rows with respect to its rows:
 *     out[r, j] = sum_c sum_d grad[c, r, d] * cells[c, j, d]
 * grad: (channels, num_rows, length), strides (grad_channel_stride, grad_row_stride, 1); cells as in
 * kw_mix_rows; out: (num_rows, n) contiguous, overwritten. Each thread sums its share of the channels
 * apart; the shares are then added in thread order, so equal inputs give equal outputs. */
void kw_rows_gradient(const float *grad, long num_rows, long grad_channel_stride, long grad_row_stride,
                      const float *cells, int n, long channel_stride, long cell_stride, long channels, long length,
                      float *out, int threads) {
    const long size = num_rows * n;
    float *partial = calloc((size_t)threads * size, sizeof(float));
    if (partial == NULL) threads = 1, partial = out, memset(out, 0, sizeof(float) * size);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) {
        const long first = channels * t / threads, last = channels * (t + 1) / threads;
        for (long c = first; c < last; c++)
            for (long r = 0; r < num_rows; r += 3)
                for (int j = 0; j < n; j += 4) {
                    const int rows_in_block = num_rows - r < 3 ? (int)(num_rows - r) : 3;
                    const int cells_in_block = n - j < 4 ? n - j : 4;
                    const float *g = grad + c * grad_channel_stride + r * grad_row_stride;
                    const float *e = cells + c * channel_stride + j * cell_stride;
                    float *o = partial + t * size + r * n + j;
                    switch (rows_in_block) {
                    case 3: BY_CELLS(3, cells_in_block, g, grad_row_stride, e, cell_stride, length, o, n) break;
                    case 2: BY_CELLS(2, cells_in_block, g, grad_row_stride, e, cell_stride, length, o, n) break;
                    default: BY_CELLS(1, cells_in_block, g, grad_row_stride, e, cell_stride, length, o, n)
                    }
                }
    }
    if (partial == out) return;
    for (long i = 0; i < size; i++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += partial[t * size + i];
        out[i] = sum;
    }
    free(partial);
}
