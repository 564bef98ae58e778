//! Which launcher started this process, and this process's place in the job, read from the
//! launcher's environment variables alone (no MPI call): OpenMPI's `mpirun`
//! (`OMPI_COMM_WORLD_*`), MPICH/Hydra and Slurm's PMI-2 (`PMI_RANK`, `PMI_SIZE`), PMIx (`srun
//! --mpi=pmix`: `PMIX_RANK` with Slurm's `SLURM_STEP_NUM_TASKS`/`SLURM_LOCALID`), or none.
//!
//! It decides whether MPI is initialised at all (a process with no launcher is world size 1
//! and never calls MPI), and gives `lmd-precompute` its worker index and count under a
//! launcher, where precompute needs no collective.

/// The launcher of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: a plain process, world size 1.
    None,
    /// OpenMPI's `mpirun`/`mpiexec` (or `srun` into OpenMPI's PMIx).
    OpenMpi,
    /// A PMI-1/2 launcher: MPICH's Hydra `mpiexec`, `srun --mpi=pmi2`.
    Pmi,
    /// A PMIx launcher other than OpenMPI's: `srun --mpi=pmix`.
    Pmix,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::None => "no launcher",
            Launcher::OpenMpi => "OpenMPI mpirun",
            Launcher::Pmi => "a PMI launcher (MPICH mpiexec, srun --mpi=pmi2)",
            Launcher::Pmix => "a PMIx launcher (srun --mpi=pmix)",
        })
    }
}

/// What the environment says about this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes on this node, when the launcher says (MPI's shared-memory
    /// split gives it otherwise).
    pub local_rank: Option<usize>,
    pub local_size: Option<usize>,
}

impl LaunchEnv {
    /// From this process's environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From a variable lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        let (launcher, rank, size, local_rank, local_size) = if let (Some(r), Some(n)) =
            (num("OMPI_COMM_WORLD_RANK"), num("OMPI_COMM_WORLD_SIZE"))
        {
            (
                Launcher::OpenMpi,
                r,
                n,
                num("OMPI_COMM_WORLD_LOCAL_RANK"),
                num("OMPI_COMM_WORLD_LOCAL_SIZE"),
            )
        } else if let (Some(r), Some(n)) = (num("PMI_RANK"), num("PMI_SIZE")) {
            (
                Launcher::Pmi,
                r,
                n,
                num("MPI_LOCALRANKID").or(num("SLURM_LOCALID")),
                num("MPI_LOCALNRANKS"),
            )
        } else if let Some(r) = num("PMIX_RANK") {
            let n = num("SLURM_STEP_NUM_TASKS")
                .or(num("SLURM_NTASKS"))
                .unwrap_or(1);
            (Launcher::Pmix, r, n, num("SLURM_LOCALID"), None)
        } else {
            (Launcher::None, 0, 1, None, None)
        };
        LaunchEnv {
            launcher,
            rank,
            world_size: size.max(1),
            local_rank,
            local_size,
        }
    }

    /// `srun` started this process (a job step of several tasks) without an MPI plugin: each
    /// task would train alone. Returns the task count.
    pub fn srun_without_mpi(get: impl Fn(&str) -> Option<String>) -> Option<usize> {
        let n = get("SLURM_STEP_NUM_TASKS")?.trim().parse::<usize>().ok()?;
        let plain = get("PMI_RANK").is_none() && get("PMIX_RANK").is_none();
        (n > 1 && plain && get("OMPI_COMM_WORLD_RANK").is_none()).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> LaunchEnv {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn launchers_are_told_apart_by_their_variables() {
        let e = env(&[]);
        assert_eq!((e.launcher, e.rank, e.world_size), (Launcher::None, 0, 1));
        let e = env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_RANK", "3"),
        ]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size, e.local_rank, e.local_size),
            (Launcher::OpenMpi, 3, 8, Some(1), Some(2))
        );
        let e = env(&[
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "4"),
            ("MPI_LOCALRANKID", "1"),
        ]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size, e.local_rank),
            (Launcher::Pmi, 1, 4, Some(1))
        );
        let e = env(&[
            ("PMIX_RANK", "5"),
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size, e.local_rank),
            (Launcher::Pmix, 5, 16, Some(1))
        );
        let m: HashMap<&str, &str> = [("SLURM_STEP_NUM_TASKS", "4")].into();
        assert_eq!(
            LaunchEnv::srun_without_mpi(|k| m.get(k).map(|v| v.to_string())),
            Some(4)
        );
        let m: HashMap<&str, &str> = [("SLURM_STEP_NUM_TASKS", "4"), ("PMIX_RANK", "0")].into();
        assert_eq!(
            LaunchEnv::srun_without_mpi(|k| m.get(k).map(|v| v.to_string())),
            None
        );
    }
}
