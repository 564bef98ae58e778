#!/usr/bin/env bash
# A CUDA 13.0 build environment from PyPI wheels, for `cargo build --features cuda` on a machine
# with no GPU, no driver and no system CUDA (this one, and CI). Source it:
#
#     source scripts/cuda-env.sh            # toolkit in ${LMD_CUDA_DIR:-$HOME/.cache/lmd/cuda-13.0}
#     cargo build --release --features cuda
#
# It installs (once) the wheels of one CUDA release, pinned together (nvcc alone pulls a
# mismatched crt/nvvm; 13.1+ writes PTX that driver 580 may reject), lays them out as a
# CUDA_HOME (bin, include, nvvm, lib with unversioned .so links), and exports CUDA_HOME, PATH,
# CUDA_COMPUTE_CAP (default 90: H100/H200), CUDARC_CUDA_VERSION and CUDAFORGE_THREADS (default:
# every core; candle-kernels' build script otherwise runs nvcc on half of them, one thread here).
#
# libcuda (the driver) is not on PyPI: the link step uses a stub lib/stubs/libcuda.so made here
# from the cu* functions cuda.h declares, with the driver's soname libcuda.so.1, as the stubs of
# a CUDA toolkit are; likewise lib/stubs/libnccl.so (soname libnccl.so.2) for the `nccl`
# feature. They are only linked against, never loaded: on a GPU machine the binary loads the
# driver's own libcuda.so.1 (and NCCL's libnccl.so.2), and the CUDA libraries (libcublas.so.13,
# ...) from the machine's CUDA or PyTorch install (LD_LIBRARY_PATH). A CPU build needs none of this.

lmd_cuda_setup() {
  local dir="${LMD_CUDA_DIR:-$HOME/.cache/lmd/cuda-13.0}"
  local home="$dir/py/nvidia/cu13"
  if [ ! -e "$dir/.complete" ]; then
    echo "cuda-env: installing the CUDA 13.0 wheels into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir/py" \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.0.19 \
      nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 || return 1
    # the unversioned names the linker looks for
    local l
    for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
      ln -sf "lib$l" "$home/lib/lib${l%%.so*}.so"
    done
    # the driver stub: every cu* function cuda.h declares, returning CUDA_ERROR_STUB_LIBRARY
    mkdir -p "$home/lib/stubs"
    echo '#include <cuda.h>' | cc -E -I"$home/include" - |
      grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
      awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$dir/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$dir/libcuda-stub.c" || return 1
    touch "$dir/.complete"
  fi
  # the NCCL stub (the `nccl` feature links -lnccl): every function of cudarc 0.19's NCCL
  # bindings, returning ncclInternalError, with NCCL's soname libnccl.so.2. The real library
  # is NCCL's own (PyTorch's nvidia-nccl-cu13 wheel) on the machine that runs the binary.
  if [ ! -e "$home/lib/stubs/libnccl.so" ]; then
    mkdir -p "$home/lib/stubs"
    {
      echo 'const char *ncclGetErrorString(int r) { (void)r; return "NCCL stub (link time only)"; }'
      local f
      for f in \
      ncclAllGather ncclAllReduce ncclAlltoAll ncclBcast ncclBroadcast ncclCommAbort \
      ncclCommCount ncclCommCuDevice ncclCommDeregister ncclCommDestroy ncclCommFinalize \
      ncclCommGetAsyncError ncclCommGetUniqueId ncclCommGrow ncclCommInitAll ncclCommInitRank \
      ncclCommInitRankConfig ncclCommInitRankScalable ncclCommMemStats ncclCommRegister \
      ncclCommResume ncclCommRevoke ncclCommShrink ncclCommSplit ncclCommSuspend \
      ncclCommUserRank ncclCommWindowDeregister ncclCommWindowRegister ncclGather \
      ncclGetLastError ncclGetUniqueId ncclGetVersion ncclGroupEnd ncclGroupSimulateEnd \
      ncclGroupStart ncclMemAlloc ncclMemFree ncclParamBind ncclParamDumpAll ncclParamGet \
      ncclParamGetAllParameterKeys ncclParamGetI ncclParamGetParameter ncclParamGetStr \
      ncclParamGetU ncclPutSignal ncclRecv ncclRedOpCreatePreMulSum ncclRedOpDestroy ncclReduce \
      ncclReduceScatter ncclResetDebugInit ncclScatter ncclSend ncclSignal ncclWaitSignal \
      ncclWinGetUserPtr; do
        echo "int $f(void) { return 3; }"
      done
    } > "$dir/libnccl-stub.c"
    cc -shared -fPIC -Wl,-soname,libnccl.so.2 -o "$home/lib/stubs/libnccl.so" "$dir/libnccl-stub.c" || return 1
  fi
  export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
  export PATH="$home/bin:$PATH"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export CUDARC_CUDA_VERSION=13000
  # candle-kernels compiles its .cu files through cudaforge, which uses half the cores unless
  # told: all of them halves its build here (484 s -> 261 s on 2 cores)
  export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
  # link time only (runtime libraries come from the machine that runs the binary)
  export LIBRARY_PATH="$home/lib:$home/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  echo "cuda-env: CUDA_HOME=$home, nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute cap $CUDA_COMPUTE_CAP" >&2
}
lmd_cuda_setup
