//! Data parallelism: the one small collective interface of lmd, its implementations, and this
//! process's place in a job.
//!
//! - [`Collective`]: sum-all-reduce of flat f32/f64 buffers, broadcast of bytes, barrier, abort.
//!   Implementations: [`Single`] (world size 1, no-ops) and, with the `mpi` feature, MPI
//!   through the `mpi` crate (rsmpi; OpenMPI or MPICH) for CPU buffers. With the `nccl`
//!   feature, CUDA gradients are summed on the device by NCCL ([`Nccl`], its id broadcast
//!   by the host collective); [`Dist::reducer`] picks per device (README: data parallelism).
//! - [`Dist`]: the collective plus the launcher, the local rank (MPI's shared-memory split)
//!   and this rank's share of the node's CPU cores. [`Dist::init`] is called once per process,
//!   by the program: with no launcher in the environment it is world size 1 and MPI is never
//!   initialised; under `mpirun`/`srun` without the `mpi` feature it refuses to start (N
//!   independent runs would write the same directory).
//! - [`Job`]: the `Dist` and the [`StopFlag`] of the signals that ask for a checkpoint and a
//!   clean exit (SIGTERM, SIGUSR1). Both are decided here, once, and passed down.
//!
//! Rules (PyTorch DDP's semantics): every rank runs the same steps on an equal share of each
//! global batch; gradients are averaged in flat buckets ([`average_gradients`]), so the
//! parameters stay identical on all ranks; the loss, the stop request and the throughput are
//! reduced over all ranks; rank 0 alone writes files. A rank that fails calls
//! [`Collective::abort`], which ends every rank (MPI_Abort): a failed peer never leaves the
//! others waiting in a collective.

mod grads;
pub mod launcher;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod signals;

pub use grads::{average_gradients, reduce_buckets, Reducer, BUCKET_ELEMS};
pub use launcher::{LaunchEnv, Launcher};
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use signals::{signal_name, StopFlag};

use crate::{DeviceSpec, Error, Result};

/// The collectives data parallelism needs, over all ranks of the job.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks of `send` into `recv` (MPI_Allreduce itself).
    fn all_reduce_into_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, in place; every rank gets the result.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.all_reduce_into_f32(&send, buf)
    }
    /// Element-wise sum over ranks, in place (losses, counts, flags).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `root`'s bytes to every rank (the length travels too).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// End the whole job now with `code` (every rank, not only this one).
    fn abort(&self, code: i32) -> !;
    /// The implementation, for messages.
    fn name(&self) -> &'static str;
}

/// World size 1: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_into_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "single process"
    }
}

/// This process's place in the job.
pub struct Dist {
    comm: Box<dyn Collective>,
    launcher: Launcher,
    local_rank: usize,
    local_size: usize,
    /// NCCL for CUDA gradients, made at the first [`Dist::reducer`] call on a CUDA device.
    #[cfg(feature = "nccl")]
    nccl: std::cell::OnceCell<Nccl>,
}

impl Dist {
    /// World size 1, no launcher (library calls, tests).
    pub fn single() -> Self {
        Dist {
            comm: Box::new(Single),
            launcher: Launcher::None,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "nccl")]
            nccl: Default::default(),
        }
    }

    /// From the environment, once per process: MPI when a launcher started it (and the build
    /// has the `mpi` feature), else world size 1.
    pub fn init() -> Result<Self> {
        let env = LaunchEnv::from_env();
        if let Some(n) = LaunchEnv::srun_without_mpi(|k| std::env::var(k).ok()) {
            return Err(Error::Invalid(format!(
                "srun started {n} tasks without an MPI plugin: each would train alone; run \
                 `srun --mpi=pmix` (or pmi2), or one task"
            )));
        }
        if env.launcher == Launcher::None {
            return Ok(Self::single());
        }
        Self::init_mpi(env)
    }

    #[cfg(feature = "mpi")]
    fn init_mpi(env: LaunchEnv) -> Result<Self> {
        let (comm, local_rank, local_size) = mpi::Mpi::init()?;
        if comm.world_size() == 1 && env.world_size > 1 {
            // MPI came up as a singleton beside its peers: each would train alone into the same
            // run directory
            return Err(Error::Invalid(format!(
                "{} started rank {} of {}, but MPI came up as world size 1: this MPI library \
                 cannot reach the launcher (with srun, try --mpi=pmix; OpenMPI from Debian or \
                 Ubuntu has no PMI-2 client), or the binary was built against another MPI",
                env.launcher, env.rank, env.world_size
            )));
        }
        if comm.world_size() != env.world_size {
            eprintln!(
                "lmd: {} says world size {}, MPI says {}: using MPI's",
                env.launcher,
                env.world_size,
                comm.world_size()
            );
        }
        Ok(Dist {
            comm: Box::new(comm),
            launcher: env.launcher,
            local_rank,
            local_size,
            #[cfg(feature = "nccl")]
            nccl: Default::default(),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi(env: LaunchEnv) -> Result<Self> {
        if env.world_size == 1 {
            return Ok(Self::single());
        }
        Err(Error::Invalid(format!(
            "started by {} as rank {} of {}, but this build has no MPI: each rank would train \
             alone. Build with `--features mpi` (needs libopenmpi-dev or libmpich-dev, and \
             libclang), or run one process",
            env.launcher, env.rank, env.world_size
        )))
    }

    pub fn comm(&self) -> &dyn Collective {
        self.comm.as_ref()
    }
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    /// Rank 0: the one that writes files and prints.
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    pub fn local_size(&self) -> usize {
        self.local_size
    }
    pub fn launcher(&self) -> Launcher {
        self.launcher
    }

    /// The device of this rank: under a launcher, `cuda`/`cuda:0` means `cuda:LOCAL_RANK` (one
    /// rank per GPU); any other device as given.
    pub fn device_for(&self, spec: DeviceSpec) -> DeviceSpec {
        match spec {
            DeviceSpec::Cuda(0) if self.local_size > 1 => DeviceSpec::Cuda(self.local_rank),
            s => s,
        }
    }

    /// This rank's CPU threads: the cores it may run on (its affinity mask) when the launcher
    /// bound it to a subset, else an equal share of the node's cores among the local ranks.
    pub fn cpu_threads(&self) -> usize {
        let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
        let online = online_cpus().unwrap_or(usable);
        if usable < online {
            usable
        } else {
            (usable / self.local_size.max(1)).max(1)
        }
    }

    /// Give the compute thread pools this rank's share ([`cpu_threads`](Self::cpu_threads)),
    /// unless `RAYON_NUM_THREADS` says otherwise; returns the count. Call before any compute.
    pub fn apply_cpu_share(&self) -> usize {
        if let Some(n) = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return n;
        }
        let n = self.cpu_threads();
        if self.world_size() > 1 {
            // read by rayon's global pool and by candle's gemm at their first use
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        n
    }

    /// One line for the log: `rank 1 of 4 (local 1 of 2, OpenMPI mpirun, MPI)`.
    pub fn describe(&self) -> String {
        format!(
            "rank {} of {} (local {} of {}, {}, {})",
            self.rank(),
            self.world_size(),
            self.local_rank,
            self.local_size,
            self.launcher,
            self.comm.name()
        )
    }

    /// Rank 0's bytes on every rank.
    pub fn broadcast_bytes(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.comm.broadcast_bytes(0, &mut bytes)?;
        Ok(bytes)
    }

    /// Rank 0's value of `v` on every rank (JSON on the wire).
    pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        v: &T,
    ) -> Result<T> {
        if self.world_size() == 1 {
            return serde_json::from_slice(&serde_json::to_vec(v).expect("serialisable"))
                .map_err(|e| Error::Invalid(format!("broadcast: {e}")));
        }
        let bytes = match self.is_root() {
            true => serde_json::to_vec(v).map_err(|e| Error::Invalid(e.to_string()))?,
            false => vec![],
        };
        let got = self.broadcast_bytes(bytes)?;
        serde_json::from_slice(&got).map_err(|e| Error::Invalid(format!("broadcast: {e}")))
    }

    /// Refuse unless every rank's `hash` equals rank 0's (parameters after loading, at each
    /// checkpoint): names the first rank that differs. The hash is computed only under
    /// several ranks.
    pub fn check_same(&self, what: &str, hash: impl FnOnce() -> Result<u64>) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let hash = hash()?;
        let root = self.broadcast_json(&hash)?;
        let mut differs = vec![0f64; self.world_size()];
        differs[self.rank()] = (hash != root) as u8 as f64;
        self.comm.all_reduce_sum_f64(&mut differs)?;
        match differs.iter().position(|&d| d > 0.0) {
            None => Ok(()),
            Some(r) => Err(Error::Invalid(format!(
                "{what} differ between rank 0 and rank {r}: the ranks diverged"
            ))),
        }
    }
}

/// The node's online CPUs (`sysconf(_SC_NPROCESSORS_ONLN)` via /sys), for telling a bound rank
/// from a free one.
fn online_cpus() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let mut it = part.split('-');
        let a: usize = it.next()?.parse().ok()?;
        let b: usize = it.next().map_or(Some(a), |b| b.parse().ok())?;
        n += b - a + 1;
    }
    Some(n)
}

/// A process's job context: its place in the job and the stop request of a signal.
pub struct Job {
    pub dist: Dist,
    pub stop: StopFlag,
}

impl Job {
    /// One process, no signal handlers (library calls, tests).
    pub fn single() -> Self {
        Job {
            dist: Dist::single(),
            stop: StopFlag::never(),
        }
    }

    /// What a program uses: [`Dist::init`], its CPU share applied, and SIGTERM/SIGUSR1
    /// handlers installed ([`StopFlag::install`]).
    pub fn from_env() -> Result<Self> {
        let dist = Dist::init()?;
        let threads = dist.apply_cpu_share();
        if dist.world_size() > 1 && dist.is_root() {
            eprintln!(
                "lmd: {} ranks ({}), {} CPU threads per rank",
                dist.world_size(),
                dist.launcher(),
                threads
            );
        }
        Ok(Job {
            dist,
            stop: StopFlag::install()?,
        })
    }

    /// End a failed job: under several ranks every rank is ended (MPI_Abort), so none waits
    /// for a peer that will never come; alone, exit with `code`.
    pub fn fail(&self, code: i32) -> ! {
        self.dist.comm().abort(code)
    }
}

/// An exit status for a run stopped by a signal after its checkpoint: EX_TEMPFAIL ("try
/// again"), so a requeued job resumes and a script's `&&` chain does not go on.
pub const EXIT_STOPPED: i32 = 75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_is_world_one_and_broadcasts_itself() {
        let d = Dist::single();
        assert_eq!((d.rank(), d.world_size(), d.is_root()), (0, 1, true));
        assert_eq!(d.broadcast_json(&vec![1u32, 2]).unwrap(), vec![1, 2]);
        d.check_same("parameters", || Ok(42)).unwrap();
        assert_eq!(d.device_for(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(0));
        assert!(d.cpu_threads() >= 1);
        let mut v = [1.0f32, 2.0];
        d.comm().all_reduce_sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert!(online_cpus().unwrap() >= 1);
    }
}
