//! lmd-bench: lmd's benchmarks, one JSON line per figure.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Benchmarks printing one JSON line per figure, baselines measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "lmd-bench", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The gradient all-reduce of data-parallel training (flat buckets from tensors) beside
    /// the engine's own all-reduce (MPI_Allreduce, or ncclAllReduce on a GPU) on a plain buffer
    /// of the same size: bus bandwidth (GB/s) and the ratio. Run under `mpirun -np 2 lmd-bench
    /// allreduce` (a build with --features mpi), or alone with --device cuda:0 (--features nccl).
    Allreduce {
        /// f32 values per all-reduce, one line each.
        #[arg(long, num_args = 1.., default_values_t = [1usize << 16, 1 << 20, 1 << 22, 1 << 24])]
        sizes: Vec<usize>,
        /// Timed repetitions per size.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Tensors the gradient is split into.
        #[arg(long, default_value_t = 64)]
        tensors: usize,
        /// Where the gradients live: cpu (MPI), or cuda:N (NCCL in a build with --features
        /// nccl, which also runs at one rank; under a launcher cuda:0 is each rank's local GPU).
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
    },
    /// Parity with the PyTorch reference vectors on a device and precision: TAESD, SD-VAE
    /// (tiny) and the MAE's forward against $LMD_SHARED/testvectors, the MAE's gradients
    /// against an f32 CPU backward; one JSON line per quantity with its bound. Exit status 1
    /// when any bound is broken.
    Parity {
        /// The shared data directory (default: $LMD_SHARED).
        #[arg(long, env = "LMD_SHARED")]
        shared: PathBuf,
        /// cpu or cuda:N (CUDA needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
        /// f32 (bounds on the max absolute error), bf16 or f16 (on the relative RMS).
        #[arg(long, default_value = "f32")]
        precision: lmd_train::model::Precision,
    },
    /// Latent shard format: bytes per record by dtype, sequential and random read speed.
    ///
    /// Uses the real TAESD latents in $LMD_SHARED/testvectors when present (else synthetic
    /// ones, said in each line's "source").
    Shards {
        /// Records in the throughput shard.
        #[arg(long, default_value_t = 16384)]
        records: usize,
        /// Random get() calls to time.
        #[arg(long, default_value_t = 4000)]
        random_gets: usize,
        /// The shared data directory (default: $LMD_SHARED).
        #[arg(long, env = "LMD_SHARED")]
        shared: Option<PathBuf>,
        /// Scratch directory for the shard files (default: a temporary directory).
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// VAE encode and decode throughput (images/s) on random images, one JSON line.
    Vae {
        /// taesd or sd-vae.
        #[arg(long, default_value = "taesd")]
        vae: lmd_train::model::vae::VaeKind,
        /// Weights directory (TAESD: taesd_{encoder,decoder}.safetensors; sd-vae: a diffusers
        /// vae/ folder), or `random` for sd-vae: SD's sizes with random weights (throughput only).
        #[arg(long)]
        vae_weights: PathBuf,
        /// Images per encode/decode call.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// Minimum seconds timed per direction.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// cpu or cuda:N (CUDA needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
        /// The VAE's compute precision: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        precision: lmd_train::model::Precision,
    },
    /// Image decode + Resize(S) + CenterCrop(S) to CHW f32, images/s (one line per thread count).
    Decode {
        /// Shard pattern (`train-{000000..000009}.tar`, globs), ILSVRC tar or ImageFolder dir.
        #[arg(long)]
        input: String,
        /// Thread counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2])]
        threads: Vec<usize>,
        /// Output side of the resize + center crop.
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Passes over the images per measurement.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also run this `pillow_decode.py` anchor on the same input (needs python3 + pillow + numpy).
        #[arg(long)]
        pillow_anchor: Option<PathBuf>,
    },
    /// The Python package lmd_latents (python/) reading a dataset sequentially, beside the Rust
    /// reader on the same shards: f32 GB/s of each and the ratio.
    PythonReader {
        /// A latent dataset directory (default: a synthetic f16 4x28x28 dataset).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Records of the synthetic dataset.
        #[arg(long, default_value_t = 8192)]
        records: usize,
        /// The shared data directory, for real TAESD latents (default: $LMD_SHARED).
        #[arg(long, env = "LMD_SHARED")]
        shared: Option<PathBuf>,
        /// The python to run.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The package folder, put on PYTHONPATH when it exists (else the installed package).
        #[arg(long, default_value = "python")]
        package_dir: PathBuf,
        /// Passes per side (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// The latent loader alone (batches/s, GB/s) against a sequential decode of the same shards,
    /// and (with --train-steps) beside the trainer's consumption and data-wait fraction.
    Loader {
        /// Latent dataset directories (default: a synthetic 4x28x28 f16 dataset).
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Records of the synthetic dataset.
        #[arg(long, default_value_t = 4096)]
        records: usize,
        /// Samples per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Shuffle window (records).
        #[arg(long, default_value_t = 8192)]
        window: usize,
        /// Minimum seconds timed for the loader.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Train this many steps on the same data and report the trainer's consumption and its
        /// data-wait fraction (0: skip).
        #[arg(long, default_value_t = 0)]
        train_steps: u64,
        /// Model preset for --train-steps.
        #[arg(long, default_value = "tiny")]
        preset: lmd_train::model::Preset,
    },
    /// LatentMae training steps (forward, backward, AdamW) in samples/s, one line per mask ratio.
    ///
    /// Default: ViT-Ti (192 wide, depth 12, 3 heads), patch 2 on 4x28x28 (196 tokens), decoder
    /// 128 x 4, batch 64, at mask ratios 0.75 and 0.15. Threads: CANDLE_NUM_THREADS / RAYON_NUM_THREADS.
    TrainStep {
        /// Model preset: tiny, small, base, large, base_patch4.
        #[arg(long, default_value = "tiny")]
        preset: lmd_train::model::Preset,
        /// Samples per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Mask ratios (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.75, 0.15])]
        ratios: Vec<f64>,
        /// Timed steps per ratio (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Also run this PyTorch baseline (`tools/torch_mae_train_step.py`; needs python3 +
        /// torch) with the same sizes and thread count, and print ours / PyTorch.
        #[arg(long)]
        torch_anchor: Option<std::path::PathBuf>,
        /// Also time each ratio with the same model on these kernels (auto, fused, ops,
        /// candle, rows; ours are LMD_KERNELS'), and print ours / that as `vs_baseline`.
        #[arg(long, conflicts_with = "composite_baseline")]
        baseline_kernels: Option<lmd_train::model::Kernels>,
        /// Short for --baseline-kernels ops: every transformer block as single-layer ops (the
        /// fused block node off).
        #[arg(long)]
        composite_baseline: bool,
        /// Pixel MAE (3 x S x S, patch P, fixed ratio 0.75) beside LMD on latents (4 x S/8,
        /// patch Q, at 0.75 and at the cosine schedule's mean ratio) with the preset's encoder
        /// and decoder, in one invocation; a summary line gives latent / pixel samples/s and
        /// the counted GMAC ratio. Defaults: the paper's ViT/16 on 224 px vs ViT/4 on 28 x 28
        /// latents. --ratios is not used.
        #[arg(long)]
        pixels: bool,
        /// S for --pixels (pixels a side; latents are S/8).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// P for --pixels (the pixel patch).
        #[arg(long, default_value_t = 16)]
        pixel_patch: usize,
        /// Q for --pixels (the latent patch).
        #[arg(long, default_value_t = 4)]
        latent_patch: usize,
        /// cpu or cuda:N (CUDA needs a build with --features cuda); TF32 for f32 matmuls on a
        /// GPU, as lmd-train.
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
        /// f32, or bf16 (lmd-train's mixed precision: bf16 compute, f32 master weights).
        #[arg(long, default_value = "f32")]
        precision: lmd_train::model::Precision,
    },
    /// The AdamW step (global norm, clipping, update) over a model's parameters as the trainer
    /// runs it off the fused CPU kernels: all parameters at once as flat vectors beside one
    /// parameter at a time, in alternating rounds on the same gradients; a line per update
    /// (seconds a step, best round) and per_param_over_flat. For a GPU (--device cuda:N), bf16,
    /// or the CPU with LMD_KERNELS=candle (on the CPU in f32 the trainer updates in place).
    Optimizer {
        /// Model preset whose parameters are updated: tiny, small, base, large, base_patch4.
        #[arg(long, default_value = "tiny")]
        preset: lmd_train::model::Preset,
        /// Timed steps per round and update.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Alternating rounds (flat, then per parameter).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// cpu or cuda:N (CUDA needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
        /// f32, or bf16 (lmd-train's mixed precision: f32 master weights and moments).
        #[arg(long, default_value = "bf16")]
        precision: lmd_train::model::Precision,
    },
    /// VitClassifier fine-tuning steps (drop path, cross-entropy, backward, AdamW) in samples/s.
    ///
    /// Default: the ViT-Ti encoder on 4x28x28 latents (196 tokens), global pool, 10 classes,
    /// drop path 0.1 (MAE's fine-tuning setting), batch 64.
    FinetuneStep {
        /// Encoder preset: tiny, small, base, large, base_patch4.
        #[arg(long, default_value = "tiny")]
        preset: lmd_train::model::Preset,
        /// Samples per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Classes of the classifier head.
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Stochastic depth rate of the last block.
        #[arg(long, default_value_t = 0.1)]
        drop_path: f64,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Also time the steps with the same model on these kernels (as train-step's), and
        /// print ours / that as `vs_baseline`.
        #[arg(long, conflicts_with = "composite_baseline")]
        baseline_kernels: Option<lmd_train::model::Kernels>,
        /// Short for --baseline-kernels ops.
        #[arg(long)]
        composite_baseline: bool,
        /// cpu or cuda:N (CUDA needs a build with --features cuda); TF32 for f32 matmuls on a
        /// GPU, as lmd-train.
        #[arg(long, default_value = "cpu")]
        device: lmd_train::DeviceSpec,
        /// f32, or bf16 (lmd-train's mixed precision: bf16 compute, f32 master weights).
        #[arg(long, default_value = "f32")]
        precision: lmd_train::model::Precision,
    },
}

/// `--baseline-kernels K`, or `ops` for `--composite-baseline` (clap refuses both).
fn baseline_of(
    kernels: Option<lmd_train::model::Kernels>,
    composite: bool,
) -> Option<lmd_train::model::Kernels> {
    kernels.or(composite.then_some(lmd_train::model::Kernels::Ops))
}

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-bench", run)
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Allreduce {
            sizes,
            iters,
            tensors,
            device,
        } => {
            let job = lmd_train::dist::Job::from_env()?;
            let opts = lmd_train::bench::AllreduceBenchOptions {
                sizes,
                iters,
                tensors,
                device,
            };
            lmd_train::bench::allreduce(&job.dist, &opts, |v| println!("{v}"))?;
        }
        Cmd::Parity {
            shared,
            device,
            precision,
        } => {
            let dev = device.open()?;
            let lines = lmd_train::parity::check(&shared, &dev, precision)?;
            let broken = lines.iter().filter(|l| !l.pass).count();
            // the kernel setting the models resolved (LMD_KERNELS; auto when unset)
            let kernels = lmd_train::model::Kernels::from_env()?;
            for l in &lines {
                let mut v = serde_json::to_value(l)?;
                v["bench"] = "parity".into();
                v["device"] = device.to_string().into();
                v["precision"] = precision.to_string().into();
                v["kernels"] = kernels.to_string().into();
                println!("{v}");
            }
            if broken > 0 {
                anyhow::bail!(
                    "parity: {broken} of {} bounds broken on {device} in {precision}",
                    lines.len()
                );
            }
        }
        Cmd::Shards {
            records,
            random_gets,
            shared,
            workdir,
        } => {
            let opts = lmd_train::bench::ShardBenchOptions {
                records,
                random_gets,
                shared,
                workdir,
            };
            lmd_train::bench::shards(&opts, |v| println!("{v}"))?;
        }
        Cmd::Vae {
            vae,
            vae_weights,
            batch,
            size,
            seconds,
            device,
            precision,
        } => {
            let opts = lmd_train::bench::VaeBenchOptions {
                device,
                precision,
                vae,
                weights: vae_weights,
                batch,
                size,
                seconds,
            };
            lmd_train::bench::vae(&opts, |v| println!("{v}"))?;
        }
        Cmd::Decode {
            input,
            threads,
            size,
            repeat,
            pillow_anchor,
        } => {
            let opts = lmd_train::bench::DecodeBenchOptions {
                input,
                threads,
                size,
                repeat,
                pillow_anchor,
            };
            lmd_train::bench::decode(&opts, |v| println!("{v}"))?;
        }
        Cmd::PythonReader {
            data,
            records,
            shared,
            python,
            package_dir,
            repeat,
        } => {
            let opts = lmd_train::bench::PythonReaderBenchOptions {
                data,
                records,
                shared,
                python,
                package_dir,
                repeat,
            };
            lmd_train::bench::python_reader(&opts, |v| println!("{v}"))?;
        }
        Cmd::Loader {
            data,
            records,
            batch,
            window,
            seconds,
            train_steps,
            preset,
        } => {
            let opts = lmd_train::bench::LoaderBenchOptions {
                data,
                records,
                batch,
                window,
                seconds,
                train_steps,
                preset,
            };
            lmd_train::bench::loader(&opts, |v| println!("{v}"))?;
        }
        Cmd::Optimizer {
            preset,
            steps,
            rounds,
            device,
            precision,
        } => {
            let opts = lmd_train::bench::OptimizerBenchOptions {
                preset,
                steps,
                rounds,
                target: lmd_train::bench::StepTarget { device, precision },
            };
            lmd_train::bench::optimizer(&opts, |v| println!("{v}"))?;
        }
        Cmd::TrainStep {
            preset,
            batch,
            ratios,
            steps,
            torch_anchor,
            baseline_kernels,
            composite_baseline,
            pixels,
            image_size,
            pixel_patch,
            latent_patch,
            device,
            precision,
        } => {
            let opts = lmd_train::bench::TrainStepOptions {
                preset,
                batch,
                ratios,
                steps,
                torch_anchor,
                baseline: baseline_of(baseline_kernels, composite_baseline),
                pixels,
                image_size,
                pixel_patch,
                latent_patch,
                target: lmd_train::bench::StepTarget { device, precision },
            };
            lmd_train::bench::train_step(&opts, |v| println!("{v}"))?;
        }
        Cmd::FinetuneStep {
            preset,
            batch,
            classes,
            drop_path,
            steps,
            baseline_kernels,
            composite_baseline,
            device,
            precision,
        } => {
            let opts = lmd_train::bench::FinetuneStepOptions {
                preset,
                batch,
                classes,
                drop_path,
                steps,
                baseline: baseline_of(baseline_kernels, composite_baseline),
                target: lmd_train::bench::StepTarget { device, precision },
            };
            lmd_train::bench::finetune_step(&opts, |v| println!("{v}"))?;
        }
    }
    Ok(())
}
