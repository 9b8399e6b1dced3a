/* Native CPU kernels of kernelwarehouse, compiled at first use by kernelwarehouse.native.
 *
 * kw_mix_rows: for every output channel c of a warehouse stored output channel first,
 *     out[c, r, :] = sum_j rows[r, j] * cells[c, j, :]          (accumulate = 0)
 *     out[c, r, :] += sum_j rows[r, j] * cells[c, j, :]         (accumulate = 1)
 * The inner dimension (the n warehouse cells) is small, 2 to a few hundred, which general matrix
 * products handle poorly; here a block of rows times a few vectors of one channel's cells is kept in
 * registers while the n cells stream through.
 * kw_rows_gradient: its gradient with respect to the rows, dot products along the length summed in
 * vectors over a few channels at a time, in an order fixed by the thread count.
 * kw_fused_conv: a convolution as a product with input patches whose per-sample weights are assembled a tile
 * at a time in cache by the same register blocks and used at once.
 * The same kernel with the roles of input and output swapped gives its input gradient, and
 * kw_fused_weight_grad the mixture and cell gradients from tiles of the weight gradient.
 *
 * Variants. The vector width and the register blocks are macros, so that this one source builds for
 * each instruction set. kernelwarehouse.native picks the variant from the CPU's flags in /proc/cpuinfo,
 * or from KERNELWAREHOUSE_ISA=avx512|avx2|portable, and compiles it with these macros and flags:
 *
 *     variant   KW_LANES  mix block (KW_MIX_*)  gradient (KW_GRAD_*)  registers  ISA flags
 *     avx512    16        6 rows x 4 vectors    4 rows x 4 cells      32 zmm     -mavx512f -mavx512vl -mavx2 -mfma
 *     avx2       8        6 rows x 2 vectors    3 rows x 3 cells      16 ymm     -mavx2 -mfma
 *     portable   4        6 rows x 2 vectors    3 rows x 3 cells      16         none (SSE2 on x86-64, NEON)
 *
 * A block has to fit the register file: the mix block holds rows x vectors accumulators, one vector of
 * cells per accumulator column and a broadcast row value (avx2: 12 + 2 + 1 of 16); the gradient block
 * rows x cells accumulators and the rows + cells vectors loaded at each step (avx2: 9 + 3 + 3 of 16).
 * A block that does not fit spills its accumulators to memory at every step: the avx512 blocks built for
 * AVX2, where each 64-byte vector takes two registers, ran kw_mix_rows 8x slower than the avx2 ones.
 * Without the macros this file builds the portable variant. Build with -ffp-contract=fast (or in a GNU
 * mode): under -std=c11 GCC otherwise multiplies and adds apart instead of fusing them.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef KW_LANES
#define KW_LANES 4            /* floats per vector */
#endif
#ifndef KW_MIX_ROWS
#define KW_MIX_ROWS 6         /* kw_mix_rows: rows per block */
#endif
#ifndef KW_MIX_VECTORS
#define KW_MIX_VECTORS 2      /* kw_mix_rows: vectors along the length per block */
#endif
#ifndef KW_GRAD_ROWS
#define KW_GRAD_ROWS 3        /* kw_rows_gradient: rows per block */
#endif
#ifndef KW_GRAD_CELLS
#define KW_GRAD_CELLS 3       /* kw_rows_gradient: cells per block */
#endif
#ifndef KW_GRAD_SPAN
#define KW_GRAD_SPAN 1024     /* kw_rows_gradient: floats of the channels' lengths per horizontal sum */
#endif
#if KW_LANES < 1 || KW_GRAD_SPAN < 1 || KW_MIX_ROWS < 1 || KW_MIX_ROWS > 8 || KW_MIX_VECTORS < 1 \
    || KW_MIX_VECTORS > 8 || KW_GRAD_ROWS < 1 || KW_GRAD_ROWS > 8 || KW_GRAD_CELLS < 1 || KW_GRAD_CELLS > 8
#error "kernelwarehouse: blocks take 1 to 8 rows, vectors or cells"
#endif

typedef float vec __attribute__((vector_size(KW_LANES * sizeof(float))));   /* the compiler picks the instructions */
enum { LANES = KW_LANES, WIDE = KW_MIX_VECTORS, MAX_ROWS = KW_MIX_ROWS, GRAD_ROWS = KW_GRAD_ROWS,
       GRAD_CELLS = KW_GRAD_CELLS };

#define INLINE static inline __attribute__((always_inline))

/* f(k, ...) for the value k = 1..8 of `value`, a run-time number no larger than the compile-time `bound`:
 * each f is compiled with k constant, and the cases above the bound are left out. */
#define CASE(k, bound, f, ...) case k: if ((k) <= (bound)) f((k) <= (bound) ? (k) : 1, __VA_ARGS__); break;
#define DISPATCH(value, bound, f, ...) switch (value) { \
    CASE(8, bound, f, __VA_ARGS__) CASE(7, bound, f, __VA_ARGS__) CASE(6, bound, f, __VA_ARGS__) \
    CASE(5, bound, f, __VA_ARGS__) CASE(4, bound, f, __VA_ARGS__) CASE(3, bound, f, __VA_ARGS__) \
    CASE(2, bound, f, __VA_ARGS__) default: f(1, __VA_ARGS__); }

INLINE vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
INLINE void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* rows_in_block x (width vectors) of the output; both constant after inlining */
INLINE void block(const int rows_in_block, const int width, const float *rows, long row_stride, int n,
                  const float *cells, long cell_stride, float *out, long out_stride, int accumulate) {
    vec acc[MAX_ROWS][WIDE];
    for (int r = 0; r < rows_in_block; r++)
        for (int k = 0; k < width; k++)
            acc[r][k] = accumulate ? load(out + r * out_stride + k * LANES) : (vec){0};
    for (int j = 0; j < n; j++) {
        vec cell[WIDE];
        for (int k = 0; k < width; k++) cell[k] = load(cells + j * cell_stride + k * LANES);
        for (int r = 0; r < rows_in_block; r++) {
            const float a = rows[r * row_stride + j];
            for (int k = 0; k < width; k++) acc[r][k] += a * cell[k];
        }
    }
    for (int r = 0; r < rows_in_block; r++)
        for (int k = 0; k < width; k++) store(out + r * out_stride + k * LANES, acc[r][k]);
}

INLINE void any_rows(const int width, int rows_in_block, const float *rows, long row_stride, int n,
                     const float *cells, long cell_stride, float *out, long out_stride, int accumulate) {
    DISPATCH(rows_in_block, MAX_ROWS, block, width, rows, row_stride, n, cells, cell_stride, out, out_stride,
             accumulate)
}

/* out[r, :length] (+)= sum_j rows[r * row_stride + j] * cells[j * cell_stride + :length], r < rows_in_block */
static void row_block(int rows_in_block, const float *rows, long row_stride, int n, const float *cells,
                      long cell_stride, long length, float *out, long out_stride, int accumulate) {
    long d = 0;
    for (; d + WIDE * LANES <= length; d += WIDE * LANES)
        any_rows(WIDE, rows_in_block, rows, row_stride, n, cells + d, cell_stride, out + d, out_stride, accumulate);
    const int vectors = (int)((length - d) / LANES);   /* fewer than WIDE: one narrower block */
    if (vectors > 0) {
        DISPATCH(vectors, WIDE - 1, any_rows, rows_in_block, rows, row_stride, n, cells + d, cell_stride, out + d,
                 out_stride, accumulate)
        d += (long)vectors * LANES;
    }
    for (; d < length; d++)
        for (int r = 0; r < rows_in_block; r++) {
            float sum = accumulate ? out[r * out_stride + d] : 0.0f;
            for (int j = 0; j < n; j++) sum += rows[r * row_stride + j] * cells[j * cell_stride + d];
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
            row_block(rows_in_block, rows + r * n, n, n, cells + c * channel_stride + start, cell_stride, size,
                      out + c * out_channel_stride + r * out_row_stride + start, out_row_stride, accumulate);
            r += rows_in_block;
        }
    }
}

/* The cells of output channels c0 .. c0 + size - 1 and columns e0 .. e0 + span - 1 as tile[e - e0][j][c - c0],
 * rows of `channels` floats. cells: (c_out, n, d) with strides (channel_stride, cell_stride, length_stride):
 * whichever of the channels or the columns is contiguous is read in runs. */
static void gather_cells(const float *cells, long channel_stride, long cell_stride, long length_stride, long c0,
                         long size, int n, long e0, long span, long channels, float *tile) {
    if (channel_stride == 1) {
        for (long e = 0; e < span; e++)
            for (int j = 0; j < n; j++)
                memcpy(tile + (e * n + j) * channels, cells + c0 + j * cell_stride + (e0 + e) * length_stride,
                       sizeof(float) * (size_t)size);
        return;
    }
    for (int j = 0; j < n; j++)
        for (long c = 0; c < size; c++) {
            const float *source = cells + (c0 + c) * channel_stride + j * cell_stride + e0 * length_stride;
            for (long e = 0; e < span; e++) tile[(e * n + j) * channels + c] = source[e * length_stride];
        }
}

/* kw_fused_conv: a product of input patches with per-sample weights that are assembled a tile at a time in
 * cache and used at once, so that no whole weight is written to memory. For sample b, position l and output
 * channel o = ob * c_out + c (out_blocks blocks of c_out channels):
 *     out[b, l, o] = sum_{q, e} cols[b, l, q * d + e] * W_b[o, q * d + e]
 *     W_b[ob * c_out + c, q * d + e] = sum_j rows[b, ob, q, j] * cells[c, j, e]
 * cols: (batch, positions, col_blocks * d), strides (cols_sample_stride, cols_row_stride, 1), the patches of
 * a convolution; rows: (batch, out_blocks, col_blocks, n) contiguous, the mixture weights; cells: (c_out, n,
 * d), strides (channel_stride, cell_stride, length_stride), the warehouse stored by output channel or, for the
 * input gradient, a transposed view of it; out: (batch, positions, out_blocks * c_out) contiguous, overwritten.
 *
 * A task is one block of `channels` output channels (and, with fewer blocks than threads, a share of the
 * batch). For each slice of `kc` weight columns (e) it assembles the weights of up to MAX_ROWS samples at once,
 * kc x channels each for every column block q, from the slice of the cells, gathered once into a tile that
 * stays in the cache for all samples (and one row of it in L1 across the column blocks); each assembled tile is then applied to
 * the sample's patches (rows of positions times vectors of channels, the register blocks of kw_mix_rows).
 * tile_floats bounds what one thread keeps in cache, (n + col_blocks * MAX_ROWS) * kc * channels floats. */
void kw_fused_conv(const float *cols, long batch, long positions, long cols_sample_stride, long cols_row_stride,
                   const float *rows, long out_blocks, long col_blocks, int n, const float *cells, long d, long c_out,
                   long channel_stride, long cell_stride, long length_stride, float *out, long channels,
                   long tile_floats, int threads) {
    long kc = tile_floats / (((long)n + col_blocks * MAX_ROWS) * channels);
    if (kc < 8) kc = 8;
    if (kc > d) kc = d;
    const long channel_blocks = (c_out + channels - 1) / channels;
    const long c_tasks = out_blocks * channel_blocks, sample_groups = (batch + MAX_ROWS - 1) / MAX_ROWS;
    long parts = 1;
    if (c_tasks < 2L * threads) {
        parts = (2L * threads + c_tasks - 1) / c_tasks;
        if (parts > sample_groups) parts = sample_groups;
    }
    const long width = out_blocks * c_out, row_stride = out_blocks * col_blocks * n;
    const long buffer = (col_blocks * MAX_ROWS + n) * kc * channels;
    float *buffers = malloc(sizeof(float) * (size_t)(buffer * threads));
    if (buffers == NULL) threads = 1, buffers = malloc(sizeof(float) * (size_t)buffer);
    if (buffers == NULL) return;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long task = 0; task < c_tasks * parts; task++) {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        float *tiles = buffers + buffer * thread, *block_cells = tiles + col_blocks * MAX_ROWS * kc * channels;
        const long ob = task / parts / channel_blocks, c0 = task / parts % channel_blocks * channels;
        const long part = task % parts;
        const long first_group = sample_groups * part / parts, last_group = sample_groups * (part + 1) / parts;
        const long size = c_out - c0 < channels ? c_out - c0 : channels;
        for (long e0 = 0; e0 < d; e0 += kc) {
            const long span = d - e0 < kc ? d - e0 : kc, tile = span * size;
            gather_cells(cells, channel_stride, cell_stride, length_stride, c0, size, n, e0, span, channels,
                         block_cells);
            for (long g = first_group; g < last_group; g++) {
                const long b0 = g * MAX_ROWS;
                const int samples = (int)(batch - b0 < MAX_ROWS ? batch - b0 : MAX_ROWS);
                const float *coefficients = rows + (b0 * out_blocks + ob) * col_blocks * n;
                /* the tiles of every column block q and sample s, (q, s, span, size); one row of cells in L1 */
                for (long e = 0; e < span; e++)
                    for (long q = 0; q < col_blocks; q++)
                        row_block(samples, coefficients + q * n, row_stride, n, block_cells + e * n * channels,
                                  channels, size, tiles + q * samples * tile + e * size, tile, 0);
                for (long q = 0; q < col_blocks; q++)
                    for (int s = 0; s < samples; s++) {
                        const float *patches = cols + (b0 + s) * cols_sample_stride + q * d + e0;
                        float *target = out + ((b0 + s) * positions) * width + ob * c_out + c0;
                        const float *weights = tiles + (q * samples + s) * tile;
                        const long row_groups = (positions + MAX_ROWS - 1) / MAX_ROWS;
                        long l = 0;
                        for (long h = 0; h < row_groups; h++) {   /* near-equal blocks of positions */
                            const int count = (int)((positions - l) / (row_groups - h));
                            row_block(count, patches + l * cols_row_stride, cols_row_stride, (int)span, weights,
                                      size, size, target + l * width, width, e0 > 0 || q > 0);
                            l += count;
                        }
                    }
            }
        }
    }
    free(buffers);
}

/* `count` floats from p, then zeros */
INLINE vec load_part(const float *p, long count) {
    vec v = {0};
    for (long k = 0; k < count; k++) v[k] = p[k];
    return v;
}

/* A block of rows_in_block x cells_in_block dot products along the lengths of `channels` channels, added
 * to out (row stride n): vector sums over all of them, and one horizontal sum each at the end. */
INLINE void dot_block(const int rows_in_block, const int cells_in_block, const float *grad, long grad_stride,
                      long grad_channel_stride, const float *cells, long cell_stride, long channel_stride,
                      long channels, long length, float *out, int n) {
    vec acc[GRAD_ROWS][GRAD_CELLS];
    for (int r = 0; r < rows_in_block; r++)
        for (int j = 0; j < cells_in_block; j++) acc[r][j] = (vec){0};
    for (long c = 0; c < channels; c++) {
        const float *gc = grad + c * grad_channel_stride, *ec = cells + c * channel_stride;
        long d = 0;
        for (; d + LANES <= length; d += LANES) {
            vec g[GRAD_ROWS], e[GRAD_CELLS];
            for (int r = 0; r < rows_in_block; r++) g[r] = load(gc + r * grad_stride + d);
            for (int j = 0; j < cells_in_block; j++) e[j] = load(ec + j * cell_stride + d);
            for (int r = 0; r < rows_in_block; r++)
                for (int j = 0; j < cells_in_block; j++) acc[r][j] += g[r] * e[j];
        }
        if (d < length) {
            vec g[GRAD_ROWS], e[GRAD_CELLS];
            for (int r = 0; r < rows_in_block; r++) g[r] = load_part(gc + r * grad_stride + d, length - d);
            for (int j = 0; j < cells_in_block; j++) e[j] = load_part(ec + j * cell_stride + d, length - d);
            for (int r = 0; r < rows_in_block; r++)
                for (int j = 0; j < cells_in_block; j++) acc[r][j] += g[r] * e[j];
        }
    }
    for (int r = 0; r < rows_in_block; r++)
        for (int j = 0; j < cells_in_block; j++) {
            float sum = 0.0f;
            for (int k = 0; k < LANES; k++) sum += acc[r][j][k];
            out[r * n + j] += sum;
        }
}

INLINE void dot_any_rows(const int cells_in_block, int rows_in_block, const float *grad, long grad_stride,
                         long grad_channel_stride, const float *cells, long cell_stride, long channel_stride,
                         long channels, long length, float *out, int n) {
    DISPATCH(rows_in_block, GRAD_ROWS, dot_block, cells_in_block, grad, grad_stride, grad_channel_stride, cells,
             cell_stride, channel_stride, channels, length, out, n)
}

/* The gradient of kw_mix_rows with respect to its rows:
 *     out[r, j] = sum_c sum_d grad[c, r, d] * cells[c, j, d]
 * grad: (channels, num_rows, length), strides (grad_channel_stride, grad_row_stride, 1); cells as in
 * kw_mix_rows; out: (num_rows, n) contiguous, overwritten. Each thread sums its share of the channels
 * apart; the shares are then added in thread order, so equal inputs give equal outputs. */
void kw_rows_gradient(const float *grad, long num_rows, long grad_channel_stride, long grad_row_stride,
                      const float *cells, int n, long channel_stride, long cell_stride, long channels, long length,
                      float *out, int threads) {
    const long size = num_rows * n;
    const long row_blocks = (num_rows + GRAD_ROWS - 1) / GRAD_ROWS;
    const int cell_blocks = (n + GRAD_CELLS - 1) / GRAD_CELLS;
    const long span = length >= KW_GRAD_SPAN ? 1 : (KW_GRAD_SPAN + length - 1) / length;
    float *partial = calloc((size_t)threads * size, sizeof(float));
    if (partial == NULL) threads = 1, partial = out, memset(out, 0, sizeof(float) * size);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) {
        const long first = channels * t / threads, last = channels * (t + 1) / threads;
        for (long c = first; c < last; c += span) {   /* a few channels at a time, for fewer horizontal sums */
            const long tile = last - c < span ? last - c : span;
            long r = 0;
            for (long b = 0; b < row_blocks; b++) {   /* blocks of near-equal size, as in kw_mix_rows */
                const int rows_in_block = (int)((num_rows - r) / (row_blocks - b));
                int j = 0;
                for (int q = 0; q < cell_blocks; q++) {
                    const int cells_in_block = (n - j) / (cell_blocks - q);
                    const float *g = grad + c * grad_channel_stride + r * grad_row_stride;
                    const float *e = cells + c * channel_stride + j * cell_stride;
                    float *o = partial + t * size + r * n + j;
                    DISPATCH(cells_in_block, GRAD_CELLS, dot_any_rows, rows_in_block, g, grad_row_stride,
                             grad_channel_stride, e, cell_stride, channel_stride, tile, length, o, n)
                    j += cells_in_block;
                }
                r += rows_in_block;
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

/* kw_fused_weight_grad: the weight side of kw_fused_conv's backward, without whole weight gradients. With
 * dW_b = dY_b^T cols_b the gradient of sample b's weight, built a tile at a time and never whole:
 *     grad_rows[b, ob, q, j] = sum_{c, e} dW_b[ob * c_out + c, q * d + e] * cells[c, j, e]
 *     grad_cells[c, j, e] = sum_{b, ob, q} rows[b, ob, q, j] * dW_b[ob * c_out + c, q * d + e]
 * cols as in kw_fused_conv; grad_t: (batch, out_blocks * c_out, positions) contiguous, the output's gradient
 * with positions innermost; rows_t: (n, batch * out_blocks * col_blocks) contiguous, the mixture weights
 * transposed; cells: (c_out, n, d), strides (channel_stride, cell_stride, 1); grad_rows: (batch * out_blocks *
 * col_blocks, n) contiguous, overwritten; grad_cells: (c_out, n, d) contiguous, overwritten.
 *
 * A task is one block of `channels` cell channels. For each slice of kc columns it builds the dW tiles of
 * every (b, ob, q) in cache (tile_floats bounds them), then takes both sums from them: the rows' gradient as
 * dot products with the cells (kw_rows_gradient's blocks), the cells' gradient as products with the
 * transposed rows (kw_mix_rows's blocks). Each task writes its own channels of grad_cells; each thread sums its
 * tasks' share of grad_rows apart, in a fixed order, and the shares are added in thread order, so equal inputs
 * give equal outputs. Returns 0, or -1 where memory ran out. */
int kw_fused_weight_grad(const float *cols, long batch, long positions, long cols_sample_stride,
                         long cols_row_stride, const float *grad_t, const float *rows_t, long out_blocks,
                         long col_blocks, int n, const float *cells, long d, long c_out, long channel_stride,
                         long cell_stride, float *grad_rows, float *grad_cells, long channels, long tile_floats,
                         int threads) {
    const long count = batch * out_blocks * col_blocks;   /* the tiles' index r = (b * out_blocks + ob) * q */
    long kc = tile_floats / (count * channels) / LANES * LANES;
    if (kc < LANES) kc = LANES;
    if (kc > d) kc = d;
    const long blocks = (c_out + channels - 1) / channels;
    const long tiles_size = count * channels * kc, rows_size = count * n, per_thread = tiles_size + rows_size;
    float *buffers = malloc(sizeof(float) * (size_t)(per_thread * threads));
    if (buffers == NULL) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) memset(buffers + t * per_thread + tiles_size, 0, sizeof(float) * rows_size);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long block = 0; block < blocks; block++) {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        float *tiles = buffers + thread * per_thread, *partial = tiles + tiles_size;
        const long c0 = block * channels, size = c_out - c0 < channels ? c_out - c0 : channels;
        const long channel_groups = (size + MAX_ROWS - 1) / MAX_ROWS, cell_groups = (n + MAX_ROWS - 1) / MAX_ROWS;
        for (long e0 = 0; e0 < d; e0 += kc) {
            const long span = d - e0 < kc ? d - e0 : kc, tile = size * span;
            for (long b = 0; b < batch; b++)   /* dW tiles, (r, size, span): dY^T (size, L) @ cols (L, span) */
                for (long ob = 0; ob < out_blocks; ob++) {
                    const float *dy = grad_t + ((b * out_blocks + ob) * c_out + c0) * positions;
                    for (long q = 0; q < col_blocks; q++) {
                        const float *x = cols + b * cols_sample_stride + q * d + e0;
                        float *target = tiles + ((b * out_blocks + ob) * col_blocks + q) * tile;
                        long c = 0;
                        for (long h = 0; h < channel_groups; h++) {
                            const int rows_in_block = (int)((size - c) / (channel_groups - h));
                            row_block(rows_in_block, dy + c * positions, positions, (int)positions, x, cols_row_stride,
                                      span, target + c * span, span, 0);
                            c += rows_in_block;
                        }
                    }
                }
            const long row_blocks = (count + GRAD_ROWS - 1) / GRAD_ROWS;   /* the rows' gradient */
            const int cell_blocks = (n + GRAD_CELLS - 1) / GRAD_CELLS;
            long r = 0;
            for (long h = 0; h < row_blocks; h++) {
                const int rows_in_block = (int)((count - r) / (row_blocks - h));
                int j = 0;
                for (int g = 0; g < cell_blocks; g++) {
                    const int cells_in_block = (n - j) / (cell_blocks - g);
                    DISPATCH(cells_in_block, GRAD_CELLS, dot_any_rows, rows_in_block, tiles + r * tile, tile, span,
                             cells + c0 * channel_stride + j * cell_stride + e0, cell_stride, channel_stride, size,
                             span, partial + r * n + j, n)
                    j += cells_in_block;
                }
                r += rows_in_block;
            }
            for (long c = 0; c < size; c++) {   /* the cells' gradient: (n, count) @ (count, span) per channel */
                long j = 0;
                for (long h = 0; h < cell_groups; h++) {
                    const int rows_in_block = (int)((n - j) / (cell_groups - h));
                    row_block(rows_in_block, rows_t + j * count, count, (int)count, tiles + c * span, tile, span,
                              grad_cells + ((c0 + c) * n + j) * d + e0, d, 0);
                    j += rows_in_block;
                }
            }
        }
    }
    for (long i = 0; i < rows_size; i++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += buffers[t * per_thread + tiles_size + i];
        grad_rows[i] = sum;
    }
    free(buffers);
    return 0;
}
