//! The stop request of a signal: SIGTERM (what `kill`, Kubernetes and Slurm send before ending
//! or preempting a job) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS`; OpenMPI's `mpirun`
//! forwards it to every rank, while it answers SIGTERM by killing the ranks a few seconds
//! later). A handler only records the signal; the training loop reads it at each step boundary,
//! agrees on it over all ranks, writes a checkpoint and exits with
//! [`EXIT_STOPPED`](super::EXIT_STOPPED).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{Error, Result};

/// The signal received (0: none), shared with the handlers.
#[derive(Clone)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag no signal sets (library calls and tests; [`request`](Self::request) still works).
    pub fn never() -> Self {
        StopFlag(Arc::new(AtomicUsize::new(0)))
    }

    /// Handlers for SIGTERM and SIGUSR1 that set this flag.
    pub fn install() -> Result<Self> {
        let f = Self::never();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register_usize(sig, f.0.clone(), sig as usize).map_err(|e| {
                Error::Invalid(format!("installing the handler of signal {sig}: {e}"))
            })?;
        }
        Ok(f)
    }

    /// The signal number that asked to stop, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// Ask to stop as signal `sig` would (tests, and programs that stop on their own terms).
    pub fn request(&self, sig: i32) {
        self.0.store(sig as usize, Ordering::Relaxed);
    }
}

/// A signal's name for messages.
pub fn signal_name(sig: i32) -> String {
    match sig {
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        signal_hook::consts::SIGUSR1 => "SIGUSR1".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigusr1_sets_the_flag_and_is_named() {
        let f = StopFlag::install().unwrap();
        assert_eq!(f.requested(), None);
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR1).unwrap();
        assert_eq!(f.requested(), Some(signal_hook::consts::SIGUSR1));
        assert_eq!(signal_name(f.requested().unwrap()), "SIGUSR1");
        let g = StopFlag::never();
        g.request(15);
        assert_eq!(signal_name(g.requested().unwrap()), "SIGTERM");
    }
}
