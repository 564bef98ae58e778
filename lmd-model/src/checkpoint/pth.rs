//! Writing PyTorch `.pth` files: torch's zip format with a protocol-2 pickle, readable by
//! `torch.load(path, weights_only=True)` and by candle's pickle reader.
//!
//! Layout (what `torch.save` writes): a zip archive, entries stored uncompressed and aligned to
//! 64 bytes, under one folder `archive/`: `data.pkl` (the pickle), `byteorder` (`little`),
//! `data/<k>` (the raw little-endian bytes of tensor k's storage) and `version` (`3`).
//! The pickle is `{'model': OrderedDict(name -> tensor)}`, the layout of MAE's released
//! checkpoints; each tensor is `torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
//! False, OrderedDict())` with the storage a persistent id
//! `('storage', torch.<Dtype>Storage, '<k>', 'cpu', numel)`. Only globals on torch's
//! `weights_only` allow-list are referenced.

use candle_core::{DType, Tensor};
use std::io::Write;
use std::path::Path;

/// A protocol-2 pickle, built opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.op(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.op(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.op(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.op(b'K');
            self.op(v as u8);
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            self.op(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.op(0x8a); // LONG1, 8 bytes little-endian two's complement
            self.op(8);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn int_tuple(&mut self, v: &[usize]) {
        self.op(b'(');
        for &x in v {
            self.int(x as i64);
        }
        self.op(b't');
    }
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
}

fn storage_class(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::U8 => "ByteStorage",
        DType::I64 => "LongStorage",
        other => candle_core::bail!("no torch storage for dtype {other:?}"),
    })
}

fn raw_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => candle_core::bail!("no torch storage for dtype {other:?}"),
    })
}

/// The pickle of `{'model': OrderedDict(...)}` for `tensors`, storages numbered in order.
fn state_dict_pickle(tensors: &[(String, Tensor)]) -> candle_core::Result<Vec<u8>> {
    let mut p = Pickle::new();
    p.op(b'}');
    p.str("model");
    p.empty_ordered_dict();
    p.op(b'(');
    for (k, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims();
        let mut stride = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * dims[i + 1];
        }
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // the storage, as a persistent id
        p.op(b'(');
        p.str("storage");
        p.global("torch", storage_class(t.dtype())?);
        p.str(&k.to_string());
        p.str("cpu");
        p.int(t.elem_count() as i64);
        p.op(b't');
        p.op(b'Q');
        p.int(0);
        p.int_tuple(dims);
        p.int_tuple(&stride);
        p.op(0x89); // requires_grad False
        p.empty_ordered_dict();
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u');
    p.op(b's');
    p.op(b'.');
    Ok(p.0)
}

/// Write `tensors` to `path` as a torch zip file holding `{'model': state_dict}` (not atomic:
/// see [`super::write_tensors`]).
pub fn write(tensors: &[(String, Tensor)], path: &Path) -> candle_core::Result<()> {
    use zip::write::SimpleFileOptions;
    let file = std::fs::File::create(path)?;
    let mut zw = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64)
        .large_file(true);
    let zerr = |e: zip::result::ZipError| candle_core::Error::Msg(format!("zip: {e}"));
    zw.start_file("archive/data.pkl", opts).map_err(zerr)?;
    zw.write_all(&state_dict_pickle(tensors)?)?;
    zw.start_file("archive/byteorder", opts).map_err(zerr)?;
    zw.write_all(b"little")?;
    for (k, (_, t)) in tensors.iter().enumerate() {
        zw.start_file(format!("archive/data/{k}"), opts)
            .map_err(zerr)?;
        zw.write_all(&raw_bytes(t)?)?;
    }
    zw.start_file("archive/version", opts).map_err(zerr)?;
    zw.write_all(b"3\n")?;
    let mut inner = zw.finish().map_err(zerr)?;
    inner.flush()?;
    Ok(())
}
