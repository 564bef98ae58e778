// The emulated kernels' driver for tests/rowops_emulated.rs:
//     emu KERNEL ROWS COLS EPS GRID WARPS DIR
// reads DIR/<input>.f32 (raw little-endian f32: x, w, b, g or y as the kernel takes), launches
// KERNEL with grid GRID and block (32, WARPS), writes DIR/out.f32.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "emulate.hpp"
// the kernels, as the GPU build compiles them
#include "../../src/rowops/kernels.cu"

static std::vector<float> load(const std::string &dir, const char *name, size_t n) {
    std::vector<float> v(n);
    FILE *f = fopen((dir + "/" + name + ".f32").c_str(), "rb");
    if (!f || fread(v.data(), sizeof(float), n, f) != n) {
        fprintf(stderr, "emu: cannot read %zu floats from %s/%s.f32\n", n, dir.c_str(), name);
        exit(2);
    }
    fclose(f);
    return v;
}

int main(int argc, char **argv) {
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
    } else {
        fprintf(stderr, "emu: unknown kernel %s\n", k.c_str());
        return 2;
    }
    FILE *f = fopen((dir + "/out.f32").c_str(), "wb");
    if (!f || fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) {
        fprintf(stderr, "emu: cannot write %s/out.f32\n", dir.c_str());
        return 2;
    }
    fclose(f);
    return 0;
}
