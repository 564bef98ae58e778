// The emulated kernels' driver for tests/rowops_emulated.rs:
//     emu KERNEL ROWS COLS EPS GRID WARPS DIR
// reads DIR/<input>.bin (raw little-endian f32, or bf16 for the _bf16 kernels: x, w, b, g or y
// as the kernel takes), launches KERNEL with grid GRID and block (32, WARPS), writes
// DIR/out.bin; the GELU kernels take ROWS x COLS elements. The attention kernels:
//     emu lmd_attention_f32|lmd_attention_bwd_f32 B N C HEADS GRID WARPS DIR
// read qkv (and dout), and write out.bin: the merged heads [B, N, C], or for the backward
// (both of its kernels, one after the other, as the CUDA launch runs them) dqkv [B, N, 3C].
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "emulate.hpp"
// the kernels, as the GPU build compiles them
#include "../../src/rowops/kernels.cu"

template <class T = float>
static std::vector<T> load(const std::string &dir, const char *name, size_t n) {
    std::vector<T> v(n);
    FILE *f = fopen((dir + "/" + name + ".bin").c_str(), "rb");
    if (!f || fread(v.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "emu: cannot read %zu values from %s/%s.bin\n", n, dir.c_str(), name);
        exit(2);
    }
    fclose(f);
    return v;
}

template <class T> static void store(const std::string &dir, const std::vector<T> &out) {
    FILE *f = fopen((dir + "/out.bin").c_str(), "wb");
    if (!f || fwrite(out.data(), sizeof(T), out.size(), f) != out.size()) {
        fprintf(stderr, "emu: cannot write %s/out.bin\n", dir.c_str());
        exit(2);
    }
    fclose(f);
}

// The GELU kernels over n = ROWS x COLS elements of T.
template <class T, class F, class B>
static void gelu(const std::string &dir, size_t n, unsigned grid, unsigned warps, F fwd, B bwd,
                 bool backward) {
    auto x = load<T>(dir, "x", n);
    std::vector<T> out(n);
    if (backward) {
        auto g = load<T>(dir, "g", n);
        lmd_launch(grid, warps, [&] { bwd(x.data(), g.data(), out.data(), (unsigned)n); });
    } else {
        lmd_launch(grid, warps, [&] { fwd(x.data(), out.data(), (unsigned)n); });
    }
    store(dir, out);
}

// The attention kernels (argv as in the header); scale 1 / sqrt(C / HEADS), as the launch.
static int attention(char **argv) {
    const std::string k = argv[1], dir = argv[8];
    const unsigned b = atoi(argv[2]), n = atoi(argv[3]), c = atoi(argv[4]),
                   heads = atoi(argv[5]), grid = atoi(argv[6]), warps = atoi(argv[7]);
    const float scale = 1.f / std::sqrt((float)(c / heads));
    const size_t r = (size_t)b * n, pn = (size_t)b * heads * n * n;
    auto qkv = load(dir, "qkv", r * 3 * c);
    std::vector<float> out;
    if (k == "lmd_attention_f32") {
        std::vector<float> p(pn, NAN);
        out.assign(r * c, NAN);
        lmd_launch(grid, warps, [&] {
            lmd_attention_f32(qkv.data(), out.data(), p.data(), b, n, c, heads, scale);
        });
    } else if (k == "lmd_attention_bwd_f32") {
        auto dout = load(dir, "dout", r * c);
        std::vector<float> ps(2 * pn, NAN);
        out.assign(r * 3 * c, NAN);
        lmd_launch(grid, warps, [&] {
            lmd_attention_bwd_q_f32(qkv.data(), dout.data(), out.data(), ps.data(), b, n, c,
                                    heads, scale);
        });
        lmd_launch(grid, warps, [&] {
            lmd_attention_bwd_kv_f32(qkv.data(), dout.data(), ps.data(), out.data(), b, n, c,
                                     heads);
        });
    } else {
        fprintf(stderr, "emu: unknown kernel %s\n", k.c_str());
        return 2;
    }
    store(dir, out);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 9 && std::string(argv[1]).rfind("lmd_attention", 0) == 0) return attention(argv);
    if (argc != 8) {
        fprintf(stderr, "usage: emu KERNEL ROWS COLS EPS GRID WARPS DIR\n");
        return 2;
    }
    const std::string k = argv[1], dir = argv[7];
    const unsigned rows = atoi(argv[2]), cols = atoi(argv[3]), grid = atoi(argv[5]),
                   warps = atoi(argv[6]);
    const float eps = (float)atof(argv[4]);
    const size_t n = (size_t)rows * cols;
    std::vector<float> out;
    if (k == "lmd_layer_norm_f32") {
        auto x = load(dir, "x", n), w = load(dir, "w", cols), b = load(dir, "b", cols);
        out.assign(n, NAN);
        lmd_launch(grid, warps, [&] {
            lmd_layer_norm_f32(x.data(), w.data(), b.data(), out.data(), rows, cols, eps);
        });
    } else if (k == "lmd_layer_norm_bwd_f32") {
        auto x = load(dir, "x", n), w = load(dir, "w", cols), g = load(dir, "g", n);
        out.assign(2 * n, NAN);
        lmd_launch(grid, warps, [&] {
            lmd_layer_norm_bwd_f32(x.data(), w.data(), g.data(), out.data(), rows, cols, eps);
        });
    } else if (k == "lmd_softmax_f32") {
        auto x = load(dir, "x", n);
        out.assign(n, NAN);
        lmd_launch(grid, warps, [&] { lmd_softmax_f32(x.data(), out.data(), rows, cols); });
    } else if (k == "lmd_softmax_bwd_f32") {
        auto y = load(dir, "y", n), g = load(dir, "g", n);
        out.assign(n, NAN);
        lmd_launch(grid, warps,
                   [&] { lmd_softmax_bwd_f32(y.data(), g.data(), out.data(), rows, cols); });
    } else if (k == "lmd_gelu_erf_f32" || k == "lmd_gelu_erf_bwd_f32") {
        gelu<float>(dir, n, grid, warps, lmd_gelu_erf_f32, lmd_gelu_erf_bwd_f32,
                    k == "lmd_gelu_erf_bwd_f32");
        return 0;
    } else if (k == "lmd_gelu_erf_bf16" || k == "lmd_gelu_erf_bwd_bf16") {
        gelu<__nv_bfloat16>(dir, n, grid, warps, lmd_gelu_erf_bf16, lmd_gelu_erf_bwd_bf16,
                            k == "lmd_gelu_erf_bwd_bf16");
        return 0;
    } else {
        fprintf(stderr, "emu: unknown kernel %s\n", k.c_str());
        return 2;
    }
    store(dir, out);
    return 0;
}
