//! Image sources: WebDataset tar shards, the official ImageNet tars, ImageFolder trees.
//!
//! Every source streams (no extraction to disk) and reports through a callback, in input order,
//! one [`SourceEvent`] per sample: a [`RawSample`] (still-encoded image bytes, key, label), a
//! [`Skip`] (the sample is unusable: shard, key, byte offset and reason), or a [`ShardFailure`]
//! (the shard itself is unreadable from some offset on: it yields its earlier samples first, and
//! the other shards go on). Member names are only ever used as keys: nothing is written to a path
//! derived from them, and links are never followed (a link member is skipped as "not a regular file").

mod archive;
mod folder;
mod ilsvrc;
mod wds;

pub use archive::{open_tar_stream, read_archive_folder, split_archive_root, TarStream};
pub use folder::read_image_folder;
pub use ilsvrc::{read_ilsvrc_train, read_ilsvrc_val, read_synsets};
pub use wds::{key_and_ext, read_webdataset_shard};

use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One sample as read from its source, image not decoded yet.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub key: String,
    pub label: Option<i64>,
    /// The encoded image file.
    pub image: Vec<u8>,
    /// Extension of the image member, lowercase (`jpg`, `png`, ...).
    pub ext: String,
    /// The shard or file it came from.
    pub source: String,
    /// Byte offset of its first member's header in the shard (0 for loose files).
    pub offset: u64,
}

/// A sample that was left out, and why (one JSONL line of the skip report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skip {
    pub source: String,
    pub key: String,
    pub offset: u64,
    pub reason: String,
}

/// A shard that could not be read (from `offset` on, when known).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardFailure {
    pub source: String,
    pub offset: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for ShardFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{}: at byte {o}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

/// What a source reports, in order.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    Sample(RawSample),
    Skip(Skip),
    ShardFailed(ShardFailure),
}

/// Whether samples need a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Labels {
    /// A sample without a (valid) label is skipped.
    #[default]
    Required,
    /// Labels are read when present; none is required.
    Optional,
}

/// Image member extensions, lowercase.
pub const IMAGE_EXTS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "jpe"];

/// The kind of an input, when it is given rather than detected (`--kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputKind {
    /// WebDataset tar shards (a pattern).
    #[serde(alias = "webdataset")]
    Wds,
    /// `ILSVRC2012_img_train.tar`: a tar of per-class tars.
    IlsvrcTrain,
    /// `ILSVRC2012_img_val.tar` with `LOC_val_solution.csv`.
    IlsvrcVal,
    /// An ImageFolder tree (a directory, or `ARCHIVE#ROOT`).
    #[serde(alias = "imagefolder")]
    Folder,
}

impl InputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Wds => "wds",
            InputKind::IlsvrcTrain => "ilsvrc-train",
            InputKind::IlsvrcVal => "ilsvrc-val",
            InputKind::Folder => "folder",
        }
    }
}

impl std::str::FromStr for InputKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<InputKind> {
        match s.trim() {
            "wds" | "webdataset" => Ok(InputKind::Wds),
            "ilsvrc-train" => Ok(InputKind::IlsvrcTrain),
            "ilsvrc-val" => Ok(InputKind::IlsvrcVal),
            "folder" | "imagefolder" => Ok(InputKind::Folder),
            other => Err(Error::InvalidInput {
                context: "--kind".into(),
                detail: format!("unknown kind {other:?} (wds, ilsvrc-train, ilsvrc-val, folder)"),
            }),
        }
    }
}

impl std::fmt::Display for InputKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One input of a precompute job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InputSpec {
    /// WebDataset tar shards (already expanded: see [`expand_pattern`]).
    WebDataset { shards: Vec<PathBuf> },
    /// `ILSVRC2012_img_train.tar`: a tar of per-class tars. Labels: line index of the WordNet id
    /// in `synsets` (`LOC_synset_mapping.txt`), else of the sorted ids found in the tar.
    IlsvrcTrain {
        tar: PathBuf,
        synsets: Option<PathBuf>,
    },
    /// `ILSVRC2012_img_val.tar` (flat), labelled by `LOC_val_solution.csv`.
    IlsvrcVal {
        tar: PathBuf,
        solution: PathBuf,
        synsets: Option<PathBuf>,
    },
    /// `root/<class>/<image>`; label = index of the sorted class folder name.
    ImageFolder { root: PathBuf },
    /// An ImageFolder tree at `root` inside a tar or tgz (`ARCHIVE#ROOT` on the command line,
    /// e.g. `imagenette2-160.tgz#imagenette2-160/train`).
    ArchiveFolder { archive: PathBuf, root: String },
}

impl InputSpec {
    /// Read all events of this input, in order; `f` returns `false` to stop early.
    pub fn read(&self, labels: Labels, f: &mut dyn FnMut(SourceEvent) -> bool) -> Result<()> {
        match self {
            InputSpec::WebDataset { shards } => {
                for s in shards {
                    if !read_webdataset_shard(s, labels, f) {
                        break;
                    }
                }
                Ok(())
            }
            InputSpec::IlsvrcTrain { tar, synsets } => {
                read_ilsvrc_train(tar, synsets.as_deref(), f)
            }
            InputSpec::IlsvrcVal {
                tar,
                solution,
                synsets,
            } => read_ilsvrc_val(tar, solution, synsets.as_deref(), f),
            InputSpec::ImageFolder { root } => read_image_folder(root, f),
            InputSpec::ArchiveFolder { archive, root } => read_archive_folder(archive, root, f),
        }
    }

    /// The number of samples, counted from tar headers (seeking past the data) or directory
    /// listings, for progress bars; `None` where that would need reading the data (the ILSVRC
    /// train tar's class tars).
    pub fn count_samples(&self) -> Option<u64> {
        fn count<'a, R: std::io::Read + 'a>(
            entries: impl Iterator<Item = std::io::Result<tar::Entry<'a, R>>>,
            keys: bool,
        ) -> u64 {
            let (mut n, mut last) = (0u64, String::new());
            for e in entries {
                let Ok(e) = e else { break };
                if !e.header().entry_type().is_file() {
                    continue;
                }
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                if keys {
                    let (key, _) = key_and_ext(&name);
                    if key != last {
                        n += 1;
                        last = key;
                    }
                } else if let Some((_, ext)) = name.rsplit_once('.') {
                    n += u64::from(IMAGE_EXTS.contains(&ext.to_ascii_lowercase().as_str()));
                }
            }
            n
        }
        let tar_members = |path: &Path, keys: bool| -> Option<u64> {
            // remote tars: counting would read them through
            if crate::storage::is_url(path.to_str()?) {
                return None;
            }
            // plain tars: seek past the data; gzip streams must be read through
            let stream = open_tar_stream(path).ok()?;
            if stream.gzip {
                let mut ar = tar::Archive::new(stream.reader);
                let n = count(ar.entries().ok()?, keys);
                Some(n)
            } else {
                let f = std::fs::File::open(path).ok()?;
                let mut ar = tar::Archive::new(std::io::BufReader::new(f));
                let n = count(ar.entries_with_seek().ok()?, keys);
                Some(n)
            }
        };
        match self {
            InputSpec::WebDataset { shards } => shards.iter().map(|s| tar_members(s, true)).sum(),
            InputSpec::IlsvrcVal { tar, .. } => tar_members(tar, false),
            InputSpec::IlsvrcTrain { .. } | InputSpec::ArchiveFolder { .. } => None,
            InputSpec::ImageFolder { root } => {
                let mut n = 0u64;
                for class in std::fs::read_dir(root).ok()?.filter_map(|e| e.ok()) {
                    if class.file_type().ok()?.is_dir() {
                        n += std::fs::read_dir(class.path()).ok()?.count() as u64;
                    }
                }
                Some(n)
            }
        }
    }

    /// The files this input reads (for splitting work and fingerprints).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            InputSpec::WebDataset { shards } => shards.clone(),
            InputSpec::IlsvrcTrain { tar, .. } | InputSpec::IlsvrcVal { tar, .. } => {
                vec![tar.clone()]
            }
            InputSpec::ImageFolder { root } => vec![root.clone()],
            InputSpec::ArchiveFolder { archive, .. } => vec![archive.clone()],
        }
    }

    /// An input of an explicit kind: `wds` (WebDataset pattern), `ilsvrc-train`, `ilsvrc-val`
    /// (needs `val_labels`) or `folder`.
    pub fn with_kind(
        path: &str,
        kind: InputKind,
        synsets: Option<&Path>,
        val_labels: Option<&Path>,
    ) -> Result<InputSpec> {
        let bad = |detail: String| Error::InvalidInput {
            context: path.to_string(),
            detail,
        };
        let single = || -> Result<PathBuf> {
            let v = expand_pattern(path)?;
            if v.len() != 1 {
                return Err(bad(format!(
                    "--kind {kind} takes one tar, the pattern gives {}",
                    v.len()
                )));
            }
            Ok(v[0].clone())
        };
        Ok(match kind {
            InputKind::Wds => InputSpec::WebDataset {
                shards: expand_pattern(path)?,
            },
            InputKind::IlsvrcTrain => InputSpec::IlsvrcTrain {
                tar: single()?,
                synsets: synsets.map(Path::to_path_buf),
            },
            InputKind::IlsvrcVal => InputSpec::IlsvrcVal {
                tar: single()?,
                solution: val_labels
                    .ok_or_else(|| {
                        bad("--kind ilsvrc-val needs --val-labels LOC_val_solution.csv".into())
                    })?
                    .to_path_buf(),
                synsets: synsets.map(Path::to_path_buf),
            },
            InputKind::Folder if split_archive_root(path).is_some() => {
                let (archive, root) = split_archive_root(path).expect("checked");
                InputSpec::ArchiveFolder { archive, root }
            }
            InputKind::Folder => {
                let p = Path::new(path);
                if !p.is_dir() {
                    return Err(bad("--kind folder needs a directory".into()));
                }
                InputSpec::ImageFolder {
                    root: p.to_path_buf(),
                }
            }
        })
    }

    /// Guess the kind of `path` (a pattern, a tar or a directory). `val_labels` makes a flat
    /// tar an ILSVRC val tar.
    pub fn detect(
        path: &str,
        synsets: Option<&Path>,
        val_labels: Option<&Path>,
    ) -> Result<InputSpec> {
        let p = Path::new(path);
        if p.is_dir() {
            return Ok(InputSpec::ImageFolder {
                root: p.to_path_buf(),
            });
        }
        if let Some((archive, root)) = split_archive_root(path) {
            return Ok(InputSpec::ArchiveFolder { archive, root });
        }
        let shards = expand_pattern(path)?;
        if shards.len() == 1 {
            let only = &shards[0];
            if let Some(sol) = val_labels {
                return Ok(InputSpec::IlsvrcVal {
                    tar: only.clone(),
                    solution: sol.to_path_buf(),
                    synsets: synsets.map(Path::to_path_buf),
                });
            }
            if first_member_is_tar(only)? {
                return Ok(InputSpec::IlsvrcTrain {
                    tar: only.clone(),
                    synsets: synsets.map(Path::to_path_buf),
                });
            }
        }
        Ok(InputSpec::WebDataset { shards })
    }
}

fn first_member_is_tar(path: &Path) -> Result<bool> {
    let s = open_tar_stream(path).map_err(|e| Error::io(path, "open", e))?;
    let mut ar = tar::Archive::new(s.reader);
    let entries = ar.entries().map_err(|e| Error::io(path, "read tar", e))?;
    for e in entries {
        let Ok(e) = e else { return Ok(false) };
        if e.header().entry_type().is_dir() {
            continue;
        }
        let name = e.path_bytes().into_owned();
        return Ok(name.ends_with(b".tar"));
    }
    Ok(false)
}

/// Expand a shard pattern: brace ranges (`train-{000000..000146}.tar`, zero-padded as written),
/// brace lists (`{a,b}`), then glob wildcards (for URLs, by listing the prefix before the first
/// wildcard). A plain existing path is itself. Sorted, no
/// duplicates; an empty expansion is an error naming the pattern.
pub fn expand_pattern(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in expand_braces(pattern).map_err(|d| Error::InvalidInput {
        context: pattern.to_string(),
        detail: d,
    })? {
        if crate::storage::is_url(&p) {
            if p.contains(['*', '?', '[']) {
                out.extend(crate::storage::glob_remote(&p)?);
            } else {
                out.push(PathBuf::from(p));
            }
        } else if p.contains(['*', '?', '[']) {
            let paths = glob::glob(&p).map_err(|e| Error::InvalidInput {
                context: pattern.to_string(),
                detail: format!("bad glob: {e}"),
            })?;
            out.extend(paths.filter_map(|x| x.ok()));
        } else {
            out.push(PathBuf::from(p));
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(Error::InvalidInput {
            context: pattern.to_string(),
            detail: "matches no file".into(),
        });
    }
    for p in &out {
        if crate::storage::is_url(&p.to_string_lossy()) {
            // a missing object is reported when it is opened (one GET, not a HEAD each)
            continue;
        }
        // the OS's own error ("No such file or directory", "Permission denied"), named by path
        if let Err(e) = std::fs::metadata(p) {
            return Err(Error::io(p, "open", e));
        }
    }
    Ok(out)
}

/// Brace expansion (first brace group, recursively).
pub(crate) fn expand_braces(s: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = s.find('{') else {
        return Ok(vec![s.to_string()]);
    };
    let close = s[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| format!("unclosed brace in {s:?}"))?;
    let (pre, body, post) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (x, y) = (
            a.parse::<u64>()
                .map_err(|_| format!("bad range {body:?}"))?,
            b.parse::<u64>()
                .map_err(|_| format!("bad range {body:?}"))?,
        );
        if y < x {
            return Err(format!("empty range {body:?}"));
        }
        let width = if a.starts_with('0') && a.len() > 1 {
            a.len()
        } else {
            0
        };
        (x..=y).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let mut out = Vec::new();
    for it in items {
        out.extend(expand_braces(&format!("{pre}{it}{post}"))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_and_lists() {
        assert_eq!(
            expand_braces("a-{000008..000011}.tar").unwrap(),
            vec![
                "a-000008.tar",
                "a-000009.tar",
                "a-000010.tar",
                "a-000011.tar"
            ]
        );
        assert_eq!(
            expand_braces("{x,y}-{1..2}").unwrap(),
            vec!["x-1", "x-2", "y-1", "y-2"]
        );
        assert!(expand_braces("a{1..").is_err());
        assert!(expand_braces("a{5..1}").is_err());
    }
}
