//! Checkpoint files in and out: safetensors (ours) and PyTorch `.pth` (torch's zip format).
//!
//! Reading ([`read_tensors`]): the format is recognised from the first bytes, not the name.
//! - safetensors: every tensor.
//! - `.pth` (a zip holding `data.pkl`, as `torch.save` writes since 1.6), through candle's pickle
//!   reader: the state dict under `model` (MAE's released checkpoints, `{'model': state_dict}`,
//!   and the training checkpoints `main_pretrain.py` writes, which also carry `optimizer`,
//!   `scaler`, `epoch` and an argparse `args`), else under `state_dict`, else the top-level dict.
//!   A `module.` prefix (a DistributedDataParallel state dict) is removed.
//! - The pre-1.6 (non-zip) torch format is refused, saying how to re-save it.
//!
//! Writing ([`write_tensors`]): safetensors, or a `.pth` that `torch.load(..., weights_only=True)`
//! reads (see [`pth`]), always through a temporary file that is fsynced and renamed, so a
//! half-written checkpoint never carries the final name.

pub mod pth;

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The file formats of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointFormat {
    Safetensors,
    /// torch's zip format (`torch.save`), with `{'model': state_dict}` at the top as MAE's
    /// released checkpoints.
    Pth,
}

impl CheckpointFormat {
    /// From a file name: `.pth`/`.pt`/`.bin` are torch files, anything else safetensors.
    pub fn from_extension(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("pth" | "pt" | "bin" | "ckpt") => CheckpointFormat::Pth,
            _ => CheckpointFormat::Safetensors,
        }
    }

    /// From the file's first bytes.
    pub fn sniff(path: &Path) -> Result<Self> {
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|e| weights(path, format!("cannot read: {e}")))?;
        if n >= 4 && head[..4] == *b"PK\x03\x04" {
            return Ok(CheckpointFormat::Pth);
        }
        if n >= 2 && head[0] == 0x80 && head[1] <= 5 {
            return Err(weights(
                path,
                "a torch file in the legacy (pre-1.6, non-zip) format: re-save it with \
                 torch.save(torch.load(f), f2) in a current PyTorch"
                    .into(),
            ));
        }
        if n == 8 {
            return Ok(CheckpointFormat::Safetensors);
        }
        Err(weights(path, format!("{n} bytes: not a checkpoint")))
    }
}

fn weights(path: &Path, detail: String) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        detail,
    }
}

/// All tensors of a checkpoint (safetensors or `.pth`, see the module doc), on `dev`, with
/// their stored dtype.
pub fn read_tensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let map = match CheckpointFormat::sniff(path)? {
        CheckpointFormat::Safetensors => candle_core::safetensors::load(path, dev)
            .map_err(|e| weights(path, format!("cannot read as safetensors: {e}")))?,
        CheckpointFormat::Pth => read_pth(path)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(dev)?)))
            .collect::<Result<_>>()?,
    };
    if map.is_empty() {
        return Err(weights(path, "holds no tensor".into()));
    }
    Ok(map)
}

/// The state dict of a torch zip file: under `model`, else `state_dict`, else the top level.
fn read_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    let perr = |e: candle_core::Error| weights(path, format!("cannot read as a torch file: {e}"));
    let mut last = None;
    for key in [Some("model"), Some("state_dict"), None] {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) => {
                let mut out = HashMap::new();
                let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
                names.sort();
                for name in names {
                    let t = pth
                        .get(name)
                        .map_err(|e| weights(path, format!("tensor {name}: {e}")))?
                        .ok_or_else(|| weights(path, format!("tensor {name} vanished")))?;
                    let name = name.strip_prefix("module.").unwrap_or(name);
                    out.insert(name.to_string(), t);
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            // `key ... not found`: try the next place a state dict can be.
            Err(e) if e.to_string().contains("not found") => last = Some(e),
            Err(e) => return Err(perr(e)),
        }
    }
    Err(match last {
        Some(e) => perr(e),
        None => weights(
            path,
            "no tensors under model, state_dict or the top level".into(),
        ),
    })
}

/// Write `tensors` (name -> tensor, any device; stored as they are, contiguous) to `path` in
/// `format`, atomically: a temporary file in the same directory, fsynced, then renamed.
pub fn write_tensors(
    tensors: &[(String, Tensor)],
    path: &Path,
    format: CheckpointFormat,
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let wres = match format {
        CheckpointFormat::Safetensors => {
            let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
            candle_core::safetensors::save(&map, &tmp).map_err(|e| e.to_string())
        }
        CheckpointFormat::Pth => pth::write(tensors, &tmp).map_err(|e| e.to_string()),
    };
    let fin = wres.and_then(|_| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = fin {
        let _ = std::fs::remove_file(&tmp);
        return Err(weights(path, format!("cannot write: {e}")));
    }
    if let Some(d) = dir {
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    }
    Ok(())
}

/// Set the variables of `varmap` whose names pass `select` from `tensors` (read from `path`):
/// every selected one must be present with its shape; errors name the file and the tensors.
/// Returns the names set, sorted.
pub(crate) fn set_vars(
    varmap: &candle_nn::VarMap,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    select: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let werr = |detail: String| Error::Weights {
        path: path.to_path_buf(),
        detail,
    };
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().filter(|n| select(n)).collect();
    names.sort();
    let mut missing = Vec::new();
    for name in &names {
        let var = &data[*name];
        match tensors.get(*name) {
            None => missing.push(format!("{name} {:?}", var.shape().dims())),
            Some(t) if t.shape() != var.shape() => {
                return Err(werr(format!(
                    "tensor {name}: shape {:?}, the model expects {:?}",
                    t.shape().dims(),
                    var.shape().dims()
                )))
            }
            Some(t) => var.set(&t.to_dtype(var.dtype())?)?,
        }
    }
    if !missing.is_empty() {
        // the first few by name: a wrong file misses hundreds
        const SHOWN: usize = 8;
        let more = match missing.len().saturating_sub(SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        missing.truncate(SHOWN);
        return Err(werr(format!(
            "missing tensors: {}{more}",
            missing.join(", ")
        )));
    }
    Ok(names.into_iter().cloned().collect())
}

/// Save the variables of `varmap` plus fixed `buffers` as safetensors, atomically
/// ([`write_tensors`]: fsynced, renamed, directory fsynced), in name order.
pub(crate) fn save_varmap(
    varmap: &candle_nn::VarMap,
    buffers: Vec<(&'static str, Tensor)>,
    path: &Path,
) -> Result<()> {
    let mut all: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    all.extend(buffers.into_iter().map(|(k, t)| (k.to_string(), t)));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    write_tensors(&all, path, CheckpointFormat::Safetensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_missing_many_tensors_names_eight_and_counts_the_rest() {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        for i in 0..11 {
            vb.get(2, &format!("w{i:02}")).unwrap();
        }
        let have: HashMap<String, Tensor> = [(
            "w00".to_string(),
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        let e = set_vars(&varmap, &have, Path::new("other.safetensors"), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("other.safetensors"), "{e}");
        assert!(e.contains("w01 [2]") && e.contains("w08 [2]"), "{e}");
        assert!(!e.contains("w09") && e.ends_with("and 2 more"), "{e}");
        // a few missing are all named
        let have: HashMap<String, Tensor> = (0..9)
            .map(|i| {
                (
                    format!("w{i:02}"),
                    Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let e = set_vars(&varmap, &have, Path::new("x"), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("missing tensors: w09 [2], w10 [2]"), "{e}");
    }

    fn sample() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                "blocks.0.attn.qkv.weight".into(),
                Tensor::arange(0f32, 24.0, &dev)
                    .unwrap()
                    .reshape((6, 4))
                    .unwrap(),
            ),
            (
                "cls_token".into(),
                Tensor::new(&[[[1.5f32, -2.0, 3.25]]], &dev).unwrap(),
            ),
            ("scalar".into(), Tensor::new(7.5f32, &dev).unwrap()),
        ]
    }

    #[test]
    fn pth_written_here_reads_back_identically_through_candles_pickle_reader() {
        let dir = tempfile::tempdir().unwrap();
        for fmt in [CheckpointFormat::Pth, CheckpointFormat::Safetensors] {
            let p = dir.path().join(format!("ck-{fmt:?}"));
            write_tensors(&sample(), &p, fmt).unwrap();
            assert_eq!(CheckpointFormat::sniff(&p).unwrap(), fmt);
            let back = read_tensors(&p, &Device::Cpu).unwrap();
            assert_eq!(back.len(), 3);
            for (name, t) in sample() {
                let b = &back[&name];
                assert_eq!(b.dims(), t.dims(), "{name}");
                assert_eq!(
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name}"
                );
            }
        }
        // nothing but the two files (no temporaries left)
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn non_checkpoints_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.pth");
        std::fs::write(&p, b"abc").unwrap();
        let e = read_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("short.pth") && e.contains("not a checkpoint"),
            "{e}"
        );
        let p = dir.path().join("legacy.pth");
        std::fs::write(&p, b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        let e = read_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("legacy"), "{e}");
        let p = dir.path().join("garbage.safetensors");
        std::fs::write(&p, [7u8; 64]).unwrap();
        let e = read_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("garbage.safetensors"), "{e}");
    }
}
