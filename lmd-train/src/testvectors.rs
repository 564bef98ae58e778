//! Reading the PyTorch reference files in `$LMD_SHARED/testvectors/` (safetensors) as plain
//! f32/u8 buffers, and locating `$LMD_SHARED`.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// `$LMD_SHARED` if set and present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("LMD_SHARED")?);
    p.is_dir().then_some(p)
}

/// A tensor read from a safetensors file, converted to f32.
#[derive(Debug, Clone)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Read tensor `name` of `path` as f32 (from f32, f16, bf16 or u8 storage).
pub fn read_f32(path: &Path, name: &str) -> Result<F32Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Tensors {
        path: path.to_path_buf(),
        detail: format!("not a safetensors file: {e}"),
    })?;
    let t = st.tensor(name).map_err(|e| Error::Tensors {
        path: path.to_path_buf(),
        detail: format!("tensor {name:?}: {e}"),
    })?;
    let raw = t.data();
    let data: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => {
            let mut out = vec![0f32; raw.len() / 2];
            lmd_data::DType::F16.decode_to_f32(raw, &mut out);
            out
        }
        safetensors::Dtype::BF16 => {
            let mut out = vec![0f32; raw.len() / 2];
            lmd_data::DType::BF16.decode_to_f32(raw, &mut out);
            out
        }
        safetensors::Dtype::U8 => raw.iter().map(|&b| b as f32).collect(),
        other => {
            return Err(Error::Tensors {
                path: path.to_path_buf(),
                detail: format!("tensor {name:?}: dtype {other:?} not supported here"),
            })
        }
    };
    Ok(F32Tensor {
        shape: t.shape().to_vec(),
        data,
    })
}
