//! Settings in one merge step, the same for every program: the program's defaults, then the
//! TOML file given with `--config`, then the flags given on the command line.
//!
//! Rules:
//! - Each program's flags are a struct (`clap::Args` + `Serialize`) whose field names are the
//!   setting's keys; a flag not given is `None` (or `false`, or an empty list) and is left out.
//! - Each layer replaces the top-level keys it names; a nested table such as `[optimizer]`
//!   replaces the whole table (its missing keys take that type's defaults, as in a file alone).
//! - The merged table is deserialised once, so an unknown key, in the file or from a flag, is
//!   refused by name, and a bad value in the file is reported with the file's name and line.

use anyhow::{anyhow, Context};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// `defaults`, then the TOML `file`, then `flags`: the program's settings.
pub fn merge<T: Serialize + DeserializeOwned>(
    defaults: &T,
    file: Option<&Path>,
    flags: &impl Serialize,
) -> anyhow::Result<T> {
    let mut table = toml::Table::try_from(defaults).context("serialising the defaults")?;
    if let Some(p) = file {
        let text = std::fs::read_to_string(p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        // The file alone first: unknown keys and bad values named with the file and line.
        toml::from_str::<T>(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        let layer: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        table.extend(layer);
    }
    table.extend(toml::Table::try_from(flags).context("serialising the flags")?);
    T::deserialize(toml::Value::Table(table)).map_err(|e| anyhow!("settings: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        a: u64,
        b: String,
        list: Vec<String>,
        opt: Option<u64>,
        inner: Inner,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        x: f64,
        y: f64,
    }

    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                a: 1,
                b: "default".into(),
                list: vec!["d".into()],
                opt: None,
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Inner { x: 0.5, y: 0.25 }
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        a: Option<u64>,
        b: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        list: Vec<String>,
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "b = \"file\"\nopt = 4\n[inner]\nx = 2.0\n").unwrap();
        let none = Flags::default();
        let c: Cfg = merge(&Cfg::default(), Some(&f), &none).unwrap();
        assert_eq!((c.a, c.b.as_str(), c.opt), (1, "file", Some(4)));
        assert_eq!(c.list, ["d"]);
        // a file's table replaces the whole table; its missing keys take the type's defaults
        assert_eq!(c.inner, Inner { x: 2.0, y: 0.25 });
        let given = Flags {
            a: Some(9),
            b: Some("flag".into()),
            list: vec!["l".into()],
        };
        let c: Cfg = merge(&Cfg::default(), Some(&f), &given).unwrap();
        assert_eq!((c.a, c.b.as_str(), c.opt), (9, "flag", Some(4)));
        assert_eq!(c.list, ["l"]);
        let c: Cfg = merge(&Cfg::default(), None, &none).unwrap();
        assert_eq!(c, Cfg::default());
    }

    #[test]
    fn unknown_keys_are_refused_by_name_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "a = 2\nbogus = 1\n").unwrap();
        let e = merge(&Cfg::default(), Some(&f), &Flags::default()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("bad.toml") && msg.contains("bogus"), "{msg}");
        // a flag that names no setting: a program bug, caught by the same check
        #[derive(Serialize)]
        struct Wrong {
            nonsense: u64,
        }
        let e = merge(&Cfg::default(), None, &Wrong { nonsense: 1 }).unwrap_err();
        assert!(format!("{e:#}").contains("nonsense"), "{e:#}");
        std::fs::write(&f, "a = \"text\"\n").unwrap();
        let e = merge(&Cfg::default(), Some(&f), &Flags::default()).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }
}
