//! ImageFolder trees: `root/<class>/<image>`, label = index of the sorted class folder name.
//! Files are visited in sorted order; links are not followed (a symlink is skipped).

use super::{RawSample, Skip, SourceEvent, IMAGE_EXTS};
use crate::{Error, Result};
use std::path::Path;

/// Stream an ImageFolder tree.
pub fn read_image_folder(root: &Path, f: &mut dyn FnMut(SourceEvent) -> bool) -> Result<()> {
    let list = |dir: &Path| -> Result<Vec<std::fs::DirEntry>> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, "read directory", e))?
            .filter_map(|e| e.ok())
            .collect();
        v.sort_by_key(|e| e.file_name());
        Ok(v)
    };
    let classes: Vec<_> = list(root)?
        .into_iter()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .collect();
    for (label, class) in classes.iter().enumerate() {
        let cname = class.file_name().to_string_lossy().into_owned();
        for file in list(&class.path())? {
            let fname = file.file_name().to_string_lossy().into_owned();
            let (stem, ext) = match fname.rfind('.') {
                Some(d) => (&fname[..d], fname[d + 1..].to_ascii_lowercase()),
                None => (fname.as_str(), String::new()),
            };
            if !IMAGE_EXTS.contains(&ext.as_str()) {
                continue;
            }
            let key = format!("{cname}/{stem}");
            let path = file.path();
            let ft = file.file_type().map_err(|e| Error::io(&path, "stat", e))?;
            let ev = if !ft.is_file() {
                SourceEvent::Skip(Skip {
                    source: path.display().to_string(),
                    key,
                    offset: 0,
                    reason: "not a regular file (links are not followed)".into(),
                })
            } else {
                match std::fs::read(&path) {
                    Ok(image) => SourceEvent::Sample(RawSample {
                        key,
                        label: Some(label as i64),
                        image,
                        ext,
                        source: path.display().to_string(),
                        offset: 0,
                    }),
                    Err(e) => SourceEvent::Skip(Skip {
                        source: path.display().to_string(),
                        key,
                        offset: 0,
                        reason: format!("cannot read: {e}"),
                    }),
                }
            };
            if !f(ev) {
                return Ok(());
            }
        }
    }
    Ok(())
}
