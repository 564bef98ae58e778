//! [`Collective`] over MPI (the `mpi` crate, rsmpi: OpenMPI or MPICH), for CPU buffers.
//!
//! MPI is initialised once per process (`MPI_Init`, single-threaded: only the training thread
//! calls MPI) and finalised when the [`Mpi`] value is dropped at the end of the program. The
//! local rank comes from `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`: the ranks that share this
//! node's memory.

use super::Collective;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

pub(super) struct Mpi {
    world: SimpleCommunicator,
    // finalises MPI on drop, after `world`
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// MPI_Init; returns the world and this rank's local rank and local size.
    pub(super) fn init() -> Result<(Mpi, usize, usize)> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        let (lr, ls) = (local.rank() as usize, local.size() as usize);
        Ok((
            Mpi {
                world,
                _universe: universe,
            },
            lr,
            ls,
        ))
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_into_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.world
            .all_reduce_into(send, recv, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        if len > 0 {
            root.broadcast_into(&mut buf[..]);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn name(&self) -> &'static str {
        "MPI"
    }
}
