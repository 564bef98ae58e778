//! Under the `cuda` feature: lmd's row kernels (`src/rowops/kernels.cu`) to PTX, named in
//! `$OUT_DIR/rowops_ptx.rs` (`KERNELS`), for `rowops`'s launches. nvcc comes from
//! `scripts/cuda-env.sh` (or any CUDA toolkit), the target from `CUDA_COMPUTE_CAP`, as for
//! candle's own kernels. A CPU build runs nothing here.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_files(["src/rowops/kernels.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("nvcc: src/rowops/kernels.cu to PTX (source scripts/cuda-env.sh)");
        ptx.write(out.join("rowops_ptx.rs"))
            .expect("writing rowops_ptx.rs");
    }
}
