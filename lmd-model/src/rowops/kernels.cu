// lmd's row kernels: LayerNorm and softmax over the last dimension of a contiguous f32 tensor
// [rows, cols], forward and backward, one kernel launch each (src/rowops/mod.rs launches them);
// the exact (erf) GELU, elementwise, f32 or bf16 in and out, computed in f32; and multi-head
// attention on the packed qkv, forward and backward (the end of the file).
//
// Rules:
// - One warp per row, ROWS_PER_BLOCK (4) warps per block: block (32, 4), grid ceil(rows / 4).
//   A warp whose row is past the end returns as a whole, so every shuffle runs on a full warp.
// - Lanes stride the row by 32 (coalesced); the row's sums are warp shuffles, no shared memory
//   and no __syncthreads.
// - LayerNorm is PyTorch's: biased variance, eps inside the square root, computed in two passes
//   (the mean, then the mean of squared deviations), never as E[x^2] - mean^2, which loses
//   every digit on a near-constant row. Statistics are recomputed in the backward (cheaper
//   than keeping them on a GPU bound by launches, and one output per op).
// - The same file compiles as C++ on the CPU under tests/rowops_emulated.rs, with
//   LMD_EMULATE defined and a header that runs each warp's lanes as threads: the kernels'
//   arithmetic and indexing are checked there against the CPU ops, on every CI run.

#ifndef LMD_EMULATE
#include <cuda_bf16.h>
#define LMD_DEV __device__ __forceinline__
#define LMD_SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#endif

LMD_DEV float lmd_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += LMD_SHFL_XOR(v, o);
    return v;
}

LMD_DEV float lmd_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, LMD_SHFL_XOR(v, o));
    return v;
}

// The row this warp owns, or rows (past the end) for a warp with none.
LMD_DEV unsigned lmd_row(unsigned rows) {
    const unsigned r = blockIdx.x * blockDim.y + threadIdx.y;
    return r < rows ? r : rows;
}

// mean and 1 / sqrt(var + eps) of row xr, in two passes; every lane gets both.
LMD_DEV void lmd_ln_stats(const float *xr, unsigned cols, float eps, float *mean, float *rstd) {
    const unsigned lane = threadIdx.x;
    float s = 0.f;
    for (unsigned c = lane; c < cols; c += 32) s += xr[c];
    const float m = lmd_warp_sum(s) / (float)cols;
    float q = 0.f;
    for (unsigned c = lane; c < cols; c += 32) {
        const float d = xr[c] - m;
        q += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(lmd_warp_sum(q) / (float)cols + eps);
}

// y = (x - mean) * rstd * w + b
extern "C" __global__ void lmd_layer_norm_f32(const float *x, const float *w, const float *b,
                                              float *y, unsigned rows, unsigned cols,
                                              float eps) {
    const unsigned row = lmd_row(rows);
    if (row == rows) return;
    const float *xr = x + (size_t)row * cols;
    float *yr = y + (size_t)row * cols;
    float mean, rstd;
    lmd_ln_stats(xr, cols, eps, &mean, &rstd);
    for (unsigned c = threadIdx.x; c < cols; c += 32) yr[c] = (xr[c] - mean) * rstd * w[c] + b[c];
}

// out [2, rows, cols]: out[0] = dx, out[1] = g * xhat (summed over rows into the weight's
// gradient by the caller; the bias's is the sum of g).
//   dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat))
extern "C" __global__ void lmd_layer_norm_bwd_f32(const float *x, const float *w, const float *g,
                                                  float *out, unsigned rows, unsigned cols,
                                                  float eps) {
    const unsigned row = lmd_row(rows);
    if (row == rows) return;
    const size_t off = (size_t)row * cols;
    const float *xr = x + off, *gr = g + off;
    float *dx = out + off, *gx = out + (size_t)rows * cols + off;
    float mean, rstd;
    lmd_ln_stats(xr, cols, eps, &mean, &rstd);
    float sa = 0.f, sb = 0.f;
    for (unsigned c = threadIdx.x; c < cols; c += 32) {
        const float xh = (xr[c] - mean) * rstd, gw = gr[c] * w[c];
        sa += gw;
        sb += gw * xh;
    }
    const float a = lmd_warp_sum(sa) / (float)cols, bb = lmd_warp_sum(sb) / (float)cols;
    for (unsigned c = threadIdx.x; c < cols; c += 32) {
        const float xh = (xr[c] - mean) * rstd;
        dx[c] = rstd * (gr[c] * w[c] - a - xh * bb);
        gx[c] = gr[c] * xh;
    }
}

// y = exp(x - max) / sum exp(x - max)
extern "C" __global__ void lmd_softmax_f32(const float *x, float *y, unsigned rows, unsigned cols) {
    const unsigned row = lmd_row(rows);
    if (row == rows) return;
    const float *xr = x + (size_t)row * cols;
    float *yr = y + (size_t)row * cols;
    float m = -INFINITY;
    for (unsigned c = threadIdx.x; c < cols; c += 32) m = fmaxf(m, xr[c]);
    m = lmd_warp_max(m);
    float s = 0.f;
    for (unsigned c = threadIdx.x; c < cols; c += 32) s += expf(xr[c] - m);
    const float inv = 1.f / lmd_warp_sum(s);
    for (unsigned c = threadIdx.x; c < cols; c += 32) yr[c] = expf(xr[c] - m) * inv;
}

// dx = y * (g - sum(g y)), from the forward's output y
extern "C" __global__ void lmd_softmax_bwd_f32(const float *y, const float *g, float *dx,
                                               unsigned rows, unsigned cols) {
    const unsigned row = lmd_row(rows);
    if (row == rows) return;
    const size_t off = (size_t)row * cols;
    const float *yr = y + off, *gr = g + off;
    float s = 0.f;
    for (unsigned c = threadIdx.x; c < cols; c += 32) s += gr[c] * yr[c];
    const float d = lmd_warp_sum(s);
    for (unsigned c = threadIdx.x; c < cols; c += 32) dx[off + c] = yr[c] * (gr[c] - d);
}

// ---------------------------------------------------------------------------------------------
// Elementwise: the same (32, 4) blocks; thread t of the grid takes elements t, t + the grid's
// threads, ... (grid: ceil(n / 128) blocks, so one element each up to 2^31 blocks).

LMD_DEV size_t lmd_elem0() {
    return ((size_t)blockIdx.x * blockDim.y + threadIdx.y) * 32 + threadIdx.x;
}
LMD_DEV size_t lmd_elem_stride() { return (size_t)gridDim.x * blockDim.y * 32; }

LMD_DEV float lmd_ld(const float *p, size_t i) { return p[i]; }
LMD_DEV float lmd_ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
LMD_DEV void lmd_st(float *p, size_t i, float v) { p[i] = v; }
LMD_DEV void lmd_st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)); dx = g (Phi(x) + x phi(x))
#define LMD_GELU(NAME, T)                                                                      \
    extern "C" __global__ void lmd_gelu_erf_##NAME(const T *x, T *y, unsigned n) {             \
        for (size_t i = lmd_elem0(); i < n; i += lmd_elem_stride()) {                          \
            const float v = lmd_ld(x, i);                                                      \
            lmd_st(y, i, 0.5f * v * (1.f + erff(v * 0.70710678118654752f)));                  \
        }                                                                                      \
    }                                                                                          \
    extern "C" __global__ void lmd_gelu_erf_bwd_##NAME(const T *x, const T *g, T *dx,         \
                                                       unsigned n) {                           \
        for (size_t i = lmd_elem0(); i < n; i += lmd_elem_stride()) {                          \
            const float v = lmd_ld(x, i);                                                      \
            const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));                   \
            const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);                      \
            lmd_st(dx, i, lmd_ld(g, i) * (cdf + v * pdf));                                     \
        }                                                                                      \
    }

LMD_GELU(f32, float)
LMD_GELU(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// Multi-head attention on the packed qkv [b, n, 3c] (timm's layout: q, k, v, each `heads`
// heads of hd = c / heads), into the merged heads [b, n, c]: softmax(scale q k^T) v per
// (sample, head). One warp per query row (forward, backward's dq) or key row (backward's dk,
// dv); rows ordered (sample, head, token), so a block's warps share one head's k and v.
// The probabilities (and, backward, scale dS) go to a scratch [b, heads, n, n] in global
// memory: a lane writes the entries j = lane, lane + 32, ... of its warp's row, and after a
// __syncwarp every lane reads the whole row. The backward recomputes P (no state kept
// between the two ops).

#ifndef LMD_EMULATE
#define LMD_SYNCWARP() __syncwarp()
#endif

struct lmd_heads {
    unsigned n, c, heads, hd;
    size_t c3;
};

LMD_DEV lmd_heads lmd_heads_of(unsigned n, unsigned c, unsigned heads) {
    return {n, c, heads, c / heads, 3 * (size_t)c};
}

// the first value of (sample bi, token i, head h) in a [b, n, width] tensor
LMD_DEV size_t lmd_at(const lmd_heads &d, unsigned bh, unsigned i, size_t width) {
    return ((size_t)(bh / d.heads) * d.n + i) * width + (size_t)(bh % d.heads) * d.hd;
}

// pr[j] = softmax_j(scale q_i . k_j) for query row i of head bh; every lane reads the row after
LMD_DEV void lmd_attention_probs(const lmd_heads &d, const float *qkv, unsigned bh, unsigned i,
                                 float scale, float *pr) {
    const unsigned lane = threadIdx.x;
    const float *q = qkv + lmd_at(d, bh, i, d.c3);
    const float *k0 = qkv + lmd_at(d, bh, 0, d.c3) + d.c;
    float m = -INFINITY;
    for (unsigned j = lane; j < d.n; j += 32) {
        const float *kj = k0 + j * d.c3;
        float s = 0.f;
        for (unsigned e = 0; e < d.hd; e++) s += q[e] * kj[e];
        s *= scale;
        pr[j] = s;
        m = fmaxf(m, s);
    }
    m = lmd_warp_max(m);
    float sum = 0.f;
    for (unsigned j = lane; j < d.n; j += 32) {
        const float e = expf(pr[j] - m);
        pr[j] = e;
        sum += e;
    }
    const float inv = 1.f / lmd_warp_sum(sum);
    for (unsigned j = lane; j < d.n; j += 32) pr[j] *= inv;
    LMD_SYNCWARP();
}

// out[bi, i, h*hd + e] = sum_j P_ij v_j[e]; p: scratch [b, heads, n, n]
extern "C" __global__ void lmd_attention_f32(const float *qkv, float *out, float *p, unsigned b,
                                             unsigned n, unsigned c, unsigned heads,
                                             float scale) {
    const lmd_heads d = lmd_heads_of(n, c, heads);
    const unsigned rows = b * heads * n, row = lmd_row(rows);
    if (row == rows) return;
    const unsigned bh = row / n, i = row % n;
    float *pr = p + (size_t)row * n;
    lmd_attention_probs(d, qkv, bh, i, scale, pr);
    const float *v0 = qkv + lmd_at(d, bh, 0, d.c3) + 2 * (size_t)c;
    float *o = out + lmd_at(d, bh, i, c);
    for (unsigned e = threadIdx.x; e < d.hd; e += 32) {
        float acc = 0.f;
        for (unsigned j = 0; j < n; j++) acc += pr[j] * v0[j * d.c3 + e];
        o[e] = acc;
    }
}

// Backward, first kernel (query rows): P into ps[0], scale dS = scale P (dP - rowsum(dP P))
// with dP = dO v^T into ps[1], and dq = scale dS k into dqkv's q columns.
// ps: scratch [2, b, heads, n, n]; dout: [b, n, c]
extern "C" __global__ void lmd_attention_bwd_q_f32(const float *qkv, const float *dout,
                                                   float *dqkv, float *ps, unsigned b,
                                                   unsigned n, unsigned c, unsigned heads,
                                                   float scale) {
    const lmd_heads d = lmd_heads_of(n, c, heads);
    const unsigned rows = b * heads * n, row = lmd_row(rows);
    if (row == rows) return;
    const unsigned bh = row / n, i = row % n, lane = threadIdx.x;
    float *pr = ps + (size_t)row * n, *dsr = ps + ((size_t)rows + row) * n;
    lmd_attention_probs(d, qkv, bh, i, scale, pr);
    const float *go = dout + lmd_at(d, bh, i, c);
    const float *k0 = qkv + lmd_at(d, bh, 0, d.c3) + c, *v0 = k0 + c;
    float acc = 0.f;
    for (unsigned j = lane; j < n; j += 32) {
        const float *vj = v0 + j * d.c3;
        float dp = 0.f;
        for (unsigned e = 0; e < d.hd; e++) dp += go[e] * vj[e];
        dsr[j] = dp;
        acc += pr[j] * dp;
    }
    const float rowdot = lmd_warp_sum(acc);
    for (unsigned j = lane; j < n; j += 32) dsr[j] = pr[j] * (dsr[j] - rowdot) * scale;
    LMD_SYNCWARP();
    float *dq = dqkv + lmd_at(d, bh, i, d.c3);
    for (unsigned e = lane; e < d.hd; e += 32) {
        float s = 0.f;
        for (unsigned j = 0; j < n; j++) s += dsr[j] * k0[j * d.c3 + e];
        dq[e] = s;
    }
}

// Backward, second kernel (key rows j): dk_j = sum_i (scale dS)_ij q_i and dv_j = sum_i P_ij
// dO_i into dqkv's k and v columns, from the first kernel's ps.
extern "C" __global__ void lmd_attention_bwd_kv_f32(const float *qkv, const float *dout,
                                                    const float *ps, float *dqkv, unsigned b,
                                                    unsigned n, unsigned c, unsigned heads) {
    const lmd_heads d = lmd_heads_of(n, c, heads);
    const unsigned rows = b * heads * n, row = lmd_row(rows);
    if (row == rows) return;
    const unsigned bh = row / n, j = row % n;
    const float *pc = ps + (size_t)bh * n * n + j, *dsc = pc + (size_t)rows * n;
    const float *q0 = qkv + lmd_at(d, bh, 0, d.c3), *go0 = dout + lmd_at(d, bh, 0, c);
    float *dk = dqkv + lmd_at(d, bh, j, d.c3) + c, *dv = dk + c;
    for (unsigned e = threadIdx.x; e < d.hd; e += 32) {
        float ak = 0.f, av = 0.f;
        for (unsigned i = 0; i < n; i++) {
            ak += dsc[(size_t)i * n] * q0[i * d.c3 + e];
            av += pc[(size_t)i * n] * go0[(size_t)i * c + e];
        }
        dk[e] = ak;
        dv[e] = av;
    }
}
