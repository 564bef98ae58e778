//! The device a job runs on, decided once: `--device` or the TOML `device` parse into a
//! [`DeviceSpec`] (`cpu`, `cuda`, `cuda:N`), which the run opens once ([`DeviceSpec::open`]) and
//! passes down. The compute path on that device is the model's `lmd_model::Backend`.

use std::str::FromStr;

use lmd_model::candle::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where a job computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device N (a build with `--features cuda`).
    Cuda(usize),
}

/// A device name that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {0:?}: expected cpu, cuda or cuda:N")]
pub struct DeviceParseError(pub String);

impl FromStr for DeviceSpec {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> std::result::Result<Self, DeviceParseError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceParseError(s.to_string())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = DeviceParseError;
    fn try_from(s: String) -> std::result::Result<Self, DeviceParseError> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// The candle device. CUDA in a build without it: an error saying how to build with it; in
    /// a CUDA build on a machine without a usable GPU: the driver's error, naming the device.
    pub fn open(self) -> Result<Device> {
        let hint = if cfg!(feature = "cuda") {
            "no usable GPU: this needs an NVIDIA driver for CUDA 13 and the device to exist"
        } else {
            "this build has no CUDA: build with --features cuda (see scripts/cuda-env.sh)"
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                // the driver's words only, not the backtrace candle attaches under RUST_BACKTRACE
                let e = e.to_string();
                let e = e.lines().next().unwrap_or_default();
                Error::Invalid(format!("device {self}: {e} ({hint})"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_print_and_round_trip_through_json() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        let j = serde_json::to_string(&DeviceSpec::Cuda(1)).unwrap();
        assert_eq!(j, "\"cuda:1\"");
        assert_eq!(
            serde_json::from_str::<DeviceSpec>(&j).unwrap(),
            DeviceSpec::Cuda(1)
        );
        assert!(serde_json::from_str::<DeviceSpec>("\"tpu\"").is_err());
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    /// (A CUDA build's refusal without a GPU is checked in CI, against a stub driver: .ci/run.)
    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_in_a_cpu_build_is_refused_saying_how_to_build_it() {
        let e = DeviceSpec::Cuda(1).open().unwrap_err().to_string();
        assert!(
            e.contains("device cuda:1") && e.contains("--features cuda"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
