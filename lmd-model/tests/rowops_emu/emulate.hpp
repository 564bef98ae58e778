// Runs src/rowops/kernels.cu on the CPU: each warp's 32 lanes are threads, a shuffle is a
// write, a barrier among the warp's lanes, a read and a second barrier (the semantics of
// __shfl_xor_sync on a converged warp). main.cpp includes it, then the kernels' source. A kernel that shuffles on a partial warp never gets past the barrier:
// the test that runs this has a timeout.
#pragma once
#define LMD_EMULATE
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

struct lmd_dim3 {
    unsigned x, y, z;
};
thread_local lmd_dim3 threadIdx, blockIdx;
static lmd_dim3 blockDim, gridDim;

// bf16 as cuda_bf16.h gives it: the high half of an f32, rounded to nearest even
struct __nv_bfloat16 {
    uint16_t bits;
};
static inline float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = (uint32_t)v.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)}; // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

struct lmd_warp {
    std::barrier<> bar{32};
    float vals[32];
};
thread_local lmd_warp *lmd_this_warp;

static float lmd_emu_shfl_xor(float v, int o) {
    const unsigned lane = threadIdx.x;
    lmd_this_warp->vals[lane] = v;
    lmd_this_warp->bar.arrive_and_wait();
    const float r = lmd_this_warp->vals[lane ^ (unsigned)o];
    lmd_this_warp->bar.arrive_and_wait();
    return r;
}

static inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

#define __global__
#define LMD_DEV static inline
#define LMD_SHFL_XOR(v, o) lmd_emu_shfl_xor((v), (o))
// __syncwarp: every lane's earlier writes seen by every lane after it
#define LMD_SYNCWARP() lmd_this_warp->bar.arrive_and_wait()

// kernel<<<grid, (32, warps)>>>(): the warps of every block one after another, each warp's
// lanes together.
template <class F> void lmd_launch(unsigned grid, unsigned warps, F kernel) {
    blockDim = {32, warps, 1};
    gridDim = {grid, 1, 1};
    for (unsigned b = 0; b < grid; b++)
        for (unsigned y = 0; y < warps; y++) {
            lmd_warp w;
            std::vector<std::thread> lanes;
            for (unsigned l = 0; l < 32; l++)
                lanes.emplace_back([&, l] {
                    threadIdx = {l, y, 0};
                    blockIdx = {b, 0, 0};
                    lmd_this_warp = &w;
                    kernel();
                });
            for (auto &t : lanes) t.join();
        }
}
