//! The official ImageNet-1k tars: `ILSVRC2012_img_train.tar` (a tar of per-class tars
//! `nXXXXXXXX.tar` holding `nXXXXXXXX_<n>.JPEG`) and the flat `ILSVRC2012_img_val.tar`,
//! labelled by Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`; the first token of
//! the prediction string is the WordNet id). Label = line index of the WordNet id in
//! `LOC_synset_mapping.txt` (the official class order), or of the sorted ids found when no
//! mapping is given.

use super::{RawSample, ShardFailure, Skip, SourceEvent, IMAGE_EXTS};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// WordNet ids in label order from `LOC_synset_mapping.txt` (`WNID description` per line).
pub fn read_synsets(path: &Path) -> Result<Vec<String>> {
    let text = String::from_utf8_lossy(&crate::storage::read(path)?).into_owned();
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(Error::InvalidInput {
            context: path.display().to_string(),
            detail: "no WordNet ids".into(),
        });
    }
    Ok(ids)
}

fn index_of(ids: &[String]) -> HashMap<String, i64> {
    ids.iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as i64))
        .collect()
}

fn open_tar(path: &Path) -> Result<tar::Archive<std::io::BufReader<Box<dyn Read + Send>>>> {
    let f = crate::storage::open_read(path)?;
    Ok(tar::Archive::new(std::io::BufReader::with_capacity(
        1 << 20,
        f,
    )))
}

fn stem_ext(name: &str) -> (String, String) {
    let base = name.rsplit('/').next().unwrap_or(name);
    match base.rfind('.') {
        Some(d) => (base[..d].to_string(), base[d + 1..].to_ascii_lowercase()),
        None => (base.to_string(), String::new()),
    }
}

/// One image member as an event: the sample, or a failure naming the member when its bytes
/// are cut short.
fn member_event(
    e: &mut impl Read,
    size: u64,
    name: &str,
    (key, ext): (String, String),
    label: i64,
    source: &str,
    offset: u64,
) -> SourceEvent {
    let mut buf = Vec::with_capacity(size as usize);
    match e.read_to_end(&mut buf) {
        Ok(_) => SourceEvent::Sample(RawSample {
            key,
            label: Some(label),
            image: buf,
            ext,
            source: source.to_string(),
            offset,
        }),
        Err(err) => SourceEvent::ShardFailed(ShardFailure {
            source: source.to_string(),
            offset: Some(offset),
            message: format!("member {name:?} cut short: {err}"),
        }),
    }
}

/// Stream the train tar of per-class tars.
pub fn read_ilsvrc_train(
    tar_path: &Path,
    synsets: Option<&Path>,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> Result<()> {
    let source = tar_path.display().to_string();
    let ids = match synsets {
        Some(p) => read_synsets(p)?,
        None => {
            // First pass over the outer headers only (seeking past the class tars): a local
            // file only, a remote one would be read through twice.
            if crate::storage::is_url(&source) {
                return Err(Error::InvalidInput {
                    context: source,
                    detail: "a remote ILSVRC train tar needs --synsets LOC_synset_mapping.txt \
                             (without it the class order takes a whole extra pass over the tar)"
                        .into(),
                });
            }
            let f = std::fs::File::open(tar_path).map_err(|e| Error::io(tar_path, "open", e))?;
            let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
            let mut ids: Vec<String> = ar
                .entries_with_seek()
                .map_err(|e| Error::io(tar_path, "read tar", e))?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                    n.strip_suffix(".tar")
                        .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids
        }
    };
    let label_of = index_of(&ids);
    let mut ar = open_tar(tar_path)?;
    let entries = ar
        .entries()
        .map_err(|e| Error::io(tar_path, "read tar", e))?;
    for outer in entries {
        let outer = match outer {
            Ok(o) => o,
            Err(e) => {
                f(SourceEvent::ShardFailed(ShardFailure {
                    source: source.clone(),
                    offset: None,
                    message: format!("corrupt or truncated tar: {e}"),
                }));
                return Ok(());
            }
        };
        let name = String::from_utf8_lossy(&outer.path_bytes()).into_owned();
        let outer_off = outer.raw_file_position();
        let Some(wnid) = name
            .strip_suffix(".tar")
            .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
        else {
            continue;
        };
        let inner_source = format!("{source}:{name}");
        let Some(&label) = label_of.get(&wnid) else {
            let go = f(SourceEvent::Skip(Skip {
                source: inner_source,
                key: wnid.clone(),
                offset: outer_off,
                reason: format!("class {wnid} is not in the synset list"),
            }));
            if !go {
                return Ok(());
            }
            continue;
        };
        if !read_class_tar(outer, &inner_source, outer_off, label, f) {
            return Ok(());
        }
    }
    Ok(())
}

/// The images of one class tar (`inner_source`, at `outer_off` in the train tar), labelled
/// `label`; `false` when `f` asked to stop.
fn read_class_tar(
    outer: impl Read,
    inner_source: &str,
    outer_off: u64,
    label: i64,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> bool {
    let mut inner = tar::Archive::new(outer);
    let inner_entries = match inner.entries() {
        Ok(x) => x,
        Err(e) => {
            return f(SourceEvent::ShardFailed(ShardFailure {
                source: inner_source.to_string(),
                offset: Some(outer_off),
                message: format!("not a tar: {e}"),
            }));
        }
    };
    for e in inner_entries {
        let mut e = match e {
            Ok(e) => e,
            Err(err) => {
                return f(SourceEvent::ShardFailed(ShardFailure {
                    source: inner_source.to_string(),
                    offset: Some(outer_off),
                    message: format!("corrupt or truncated class tar: {err}"),
                }));
            }
        };
        let iname = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let (key, ext) = stem_ext(&iname);
        let offset = outer_off + e.raw_header_position();
        let ev = if !e.header().entry_type().is_file() {
            SourceEvent::Skip(Skip {
                source: inner_source.to_string(),
                key,
                offset,
                reason: "not a regular file".into(),
            })
        } else if !IMAGE_EXTS.contains(&ext.as_str()) {
            continue;
        } else {
            let size = e.size();
            member_event(
                &mut e,
                size,
                &iname,
                (key, ext),
                label,
                inner_source,
                offset,
            )
        };
        if !f(ev) {
            return false;
        }
    }
    true
}

/// Stream the flat val tar, labelled by `LOC_val_solution.csv`.
pub fn read_ilsvrc_val(
    tar_path: &Path,
    solution: &Path,
    synsets: Option<&Path>,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> Result<()> {
    let text = String::from_utf8_lossy(&crate::storage::read(solution)?).into_owned();
    let mut wnid_of: HashMap<String, String> = HashMap::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let Some((id, pred)) = line.split_once(',') else {
            continue;
        };
        let wnid = pred
            .split_whitespace()
            .next()
            .ok_or_else(|| Error::InvalidInput {
                context: format!("{}:{}", solution.display(), n + 1),
                detail: "empty PredictionString".into(),
            })?;
        wnid_of.insert(id.trim().to_string(), wnid.to_string());
    }
    let ids = match synsets {
        Some(p) => read_synsets(p)?,
        None => {
            let mut v: Vec<String> = wnid_of.values().cloned().collect();
            v.sort();
            v.dedup();
            v
        }
    };
    let label_of = index_of(&ids);
    let source = tar_path.display().to_string();
    let mut ar = open_tar(tar_path)?;
    let entries = ar
        .entries()
        .map_err(|e| Error::io(tar_path, "read tar", e))?;
    for e in entries {
        let mut e = match e {
            Ok(e) => e,
            Err(err) => {
                f(SourceEvent::ShardFailed(ShardFailure {
                    source: source.clone(),
                    offset: None,
                    message: format!("corrupt or truncated tar: {err}"),
                }));
                return Ok(());
            }
        };
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let (key, ext) = stem_ext(&name);
        let offset = e.raw_header_position();
        if !IMAGE_EXTS.contains(&ext.as_str()) && e.header().entry_type().is_file() {
            continue;
        }
        let skip = |reason: String| {
            SourceEvent::Skip(Skip {
                source: source.clone(),
                key: key.clone(),
                offset,
                reason,
            })
        };
        let ev = if !e.header().entry_type().is_file() {
            skip("not a regular file".into())
        } else {
            match wnid_of
                .get(&key)
                .and_then(|w| label_of.get(w).map(|l| (w, *l)))
            {
                None => skip(match wnid_of.get(&key) {
                    Some(w) => format!("class {w} is not in the synset list"),
                    None => format!("no entry in {}", solution.display()),
                }),
                Some((_, label)) => {
                    let size = e.size();
                    member_event(
                        &mut e,
                        size,
                        &name,
                        (key.clone(), ext),
                        label,
                        &source,
                        offset,
                    )
                }
            }
        };
        if !f(ev) {
            return Ok(());
        }
    }
    Ok(())
}
