//! The named model sizes (`tiny` ... `base_patch4`), as settings and flags name them.

use crate::{Error, MaeConfig};
use serde::{Deserialize, Serialize};

/// A named model size (`MaeConfig::tiny()` ...), as settings and flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    #[default]
    Tiny,
    Small,
    Base,
    Large,
    BasePatch4,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Base,
        Preset::Large,
        Preset::BasePatch4,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::Large => "large",
            Preset::BasePatch4 => "base_patch4",
        }
    }

    pub fn config(self) -> MaeConfig {
        match self {
            Preset::Tiny => MaeConfig::tiny(),
            Preset::Small => MaeConfig::small(),
            Preset::Base => MaeConfig::base(),
            Preset::Large => MaeConfig::large(),
            Preset::BasePatch4 => MaeConfig::base_patch4(),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> crate::Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.as_str() == s.trim())
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown model preset {s:?} (expected tiny, small, base, large or base_patch4)"
                ))
            })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
