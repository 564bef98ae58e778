//! Opening tar inputs, plain or gzip-compressed (`.tar.gz`/`.tgz`, recognised by their magic
//! bytes, not their names), as one byte stream; and ImageFolder trees inside such an archive
//! (`imagenette2-160.tgz#imagenette2-160/train`: `<root>/<class>/<image>` members).
//!
//! Offsets reported for a compressed archive are positions in the decompressed tar stream.
//! Nothing is extracted to disk; the folder reader passes over the archive twice (class names
//! first, for labels in sorted order, as torchvision's `ImageFolder`).

use super::{RawSample, ShardFailure, Skip, SourceEvent, IMAGE_EXTS};
use crate::{Error, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// A tar input: the file's bytes, decompressed when it is gzip.
pub struct TarStream {
    pub reader: Box<dyn Read + Send>,
    /// Whether it is compressed (offsets are then in the decompressed stream and the file's
    /// length says nothing about the tar's).
    pub gzip: bool,
}

/// Open `path` (a file or a URL, streamed) as a tar stream (see the module doc).
pub fn open_tar_stream(path: &Path) -> std::io::Result<TarStream> {
    let raw = crate::storage::open_read(path).map_err(std::io::Error::other)?;
    let mut buf = BufReader::with_capacity(1 << 20, raw);
    let gzip = buf.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        TarStream {
            reader: Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::read::MultiGzDecoder::new(buf),
            )),
            gzip: true,
        }
    } else {
        TarStream {
            reader: Box::new(buf),
            gzip: false,
        }
    })
}

/// Split `ARCHIVE#ROOT` (an ImageFolder tree at `ROOT` inside a tar or tgz) when ARCHIVE is an
/// existing file.
pub fn split_archive_root(input: &str) -> Option<(std::path::PathBuf, String)> {
    let (a, root) = input.rsplit_once('#')?;
    let p = Path::new(a);
    p.is_file()
        .then(|| (p.to_path_buf(), root.trim_matches('/').to_string()))
}

/// `(class, stem, ext)` of a member `ROOT/class/file.ext` with an image extension.
fn folder_member<'a>(name: &'a str, root: &str) -> Option<(&'a str, &'a str, String)> {
    let rest = if root.is_empty() {
        name
    } else {
        name.strip_prefix(root)?.strip_prefix('/')?
    };
    let (class, file) = rest.split_once('/')?;
    if class.is_empty() || file.contains('/') {
        return None;
    }
    let (stem, ext) = file.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    IMAGE_EXTS
        .contains(&ext.as_str())
        .then_some((class, stem, ext))
}

/// Stream the ImageFolder tree at `root` inside the tar/tgz `archive`, in archive order;
/// label = index of the class folder among the sorted class folders.
pub fn read_archive_folder(
    archive: &Path,
    root: &str,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> Result<()> {
    let open = || -> Result<tar::Archive<Box<dyn Read + Send>>> {
        Ok(tar::Archive::new(
            open_tar_stream(archive)
                .map_err(|e| Error::io(archive, "open", e))?
                .reader,
        ))
    };
    let source = archive.display().to_string();
    // An archive that cannot be read through is a failed input (the other inputs go on):
    // before the labels are known nothing is yielded (an incomplete class list would give
    // wrong labels); later, the samples before the failure stand.
    let failed = |offset: Option<u64>, message: String| {
        SourceEvent::ShardFailed(ShardFailure {
            source: source.clone(),
            offset,
            message,
        })
    };
    let Some(index) = class_index(archive, root, &mut open()?, f)? else {
        return Ok(());
    };
    let mut ar = open()?;
    let mut at = 0u64;
    for e in ar
        .entries()
        .map_err(|e| Error::io(archive, "read tar", e))?
    {
        let mut e = match e {
            Ok(e) => e,
            Err(err) => {
                f(failed(
                    Some(at),
                    format!("cannot read the archive through: {err}"),
                ));
                return Ok(());
            }
        };
        at = e.raw_header_position();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let Some((class, stem, ext)) = folder_member(&name, root) else {
            continue;
        };
        let key = format!("{class}/{stem}");
        let offset = e.raw_header_position();
        let ev = if !e.header().entry_type().is_file() {
            SourceEvent::Skip(Skip {
                source: source.clone(),
                key,
                offset,
                reason: "not a regular file (links are not followed)".into(),
            })
        } else {
            let mut image = Vec::with_capacity(e.size() as usize);
            match e.read_to_end(&mut image) {
                Ok(_) => SourceEvent::Sample(RawSample {
                    key,
                    label: Some(index[class]),
                    image,
                    ext,
                    source: source.clone(),
                    offset,
                }),
                Err(err) => {
                    f(failed(
                        Some(offset),
                        format!("cannot read member {name}: {err}"),
                    ));
                    return Ok(());
                }
            }
        };
        if !f(ev) {
            break;
        }
    }
    Ok(())
}

/// The first pass of [`read_archive_folder`]: the label of each class folder under `root`
/// (sorted names), or `None` when the archive cannot be read through (reported to `f`).
fn class_index(
    archive: &Path,
    root: &str,
    ar: &mut tar::Archive<Box<dyn Read + Send>>,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> Result<Option<std::collections::HashMap<String, i64>>> {
    let source = archive.display().to_string();
    let mut classes = std::collections::BTreeSet::new();
    let mut at = 0u64;
    for e in ar
        .entries()
        .map_err(|e| Error::io(archive, "read tar", e))?
    {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                f(SourceEvent::ShardFailed(ShardFailure {
                    source: source.clone(),
                    offset: Some(at),
                    message: format!("cannot read the archive through: {err}"),
                }));
                return Ok(None);
            }
        };
        at = e.raw_header_position();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if let Some((c, _, _)) = folder_member(&name, root) {
            classes.insert(c.to_string());
        }
    }
    if classes.is_empty() {
        return Err(Error::InvalidInput {
            context: format!("{source}#{root}"),
            detail: format!("no ImageFolder tree at {root:?} (members {root}/<class>/<image>)"),
        });
    }
    Ok(Some(
        classes
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i as i64))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_members_are_root_class_file() {
        assert_eq!(
            folder_member("imagenette2-160/train/n01/a.JPEG", "imagenette2-160/train"),
            Some(("n01", "a", "jpeg".into()))
        );
        assert_eq!(
            folder_member("imagenette2-160/val/n01/a.JPEG", "imagenette2-160/train"),
            None
        );
        assert_eq!(
            folder_member("imagenette2-160/train/n01/x/a.jpg", "imagenette2-160/train"),
            None
        );
        assert_eq!(
            folder_member("imagenette2-160/train/a.csv", "imagenette2-160/train"),
            None
        );
        assert_eq!(
            folder_member("n02/b.png", ""),
            Some(("n02", "b", "png".into()))
        );
    }
}
