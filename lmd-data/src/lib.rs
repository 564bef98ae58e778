//! lmd-data: the framework-free half of lmd.
//!
//! It reads and writes the latent shard format ([`shard`]), and hands out plain typed buffers
//! (`Vec<f32>`, `&[u8]`), never tensors of any ML framework: `lmd-train` joins it to `lmd-model`.
//!
//! Rules: every fallible call returns [`Error`], whose message names the file (and block, record
//! or key) it is about; nothing here panics on bad input.

pub mod decode;
pub mod dtype;
pub mod error;
pub mod loader;
pub mod pipeline;
pub mod pixel_loader;
mod pixels;
pub mod shard;
pub mod source;
pub mod storage;
pub mod synthetic;
pub mod transform;
#[cfg(feature = "turbojpeg")]
mod turbo;

pub use dtype::DType;
pub use error::{Error, Result};
