//! WebDataset tar shards: a sample is the run of adjacent members sharing a key (the member path
//! up to the first dot of its basename); the image is the `.jpg/.jpeg/.png/.webp` member, the
//! label the `.cls` (decimal text) or `.json` (a number, or an object with `label`/`cls`) member.

use super::{Labels, RawSample, ShardFailure, Skip, SourceEvent, IMAGE_EXTS};
use std::io::Read;
use std::path::Path;

/// Split a member path into (key, extension): the key is the path up to the first dot of the
/// basename (`dir.with.dots/a.b.jpg` -> (`dir.with.dots/a`, `b.jpg`)).
pub fn key_and_ext(path: &str) -> (String, String) {
    let (dir, base) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    match base.find('.') {
        Some(d) => (
            format!("{dir}{}", &base[..d]),
            base[d + 1..].to_ascii_lowercase(),
        ),
        None => (path.to_string(), String::new()),
    }
}

#[derive(Default)]
struct Pending {
    key: String,
    offset: u64,
    image: Option<(String, Vec<u8>)>,
    cls: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
    not_regular: bool,
}

impl Pending {
    /// Keep a member of this sample: the first image, the `.cls` and `.json` labels.
    fn add(&mut self, ext: &str, buf: Vec<u8>) {
        let last = ext.rsplit('.').next().unwrap_or("");
        if IMAGE_EXTS.contains(&last) {
            if self.image.is_none() {
                self.image = Some((last.to_string(), buf));
            }
        } else if ext == "cls" {
            self.cls = Some(buf);
        } else if ext == "json" {
            self.json = Some(buf);
        }
    }
}

fn parse_label(p: &Pending) -> std::result::Result<Option<i64>, String> {
    if let Some(c) = &p.cls {
        let t = String::from_utf8_lossy(c);
        return t.trim().parse::<i64>().map(Some).map_err(|_| {
            format!(
                ".cls is not an integer: {:?}",
                t.chars().take(20).collect::<String>()
            )
        });
    }
    if let Some(j) = &p.json {
        let v: serde_json::Value =
            serde_json::from_slice(j).map_err(|e| format!(".json is not JSON: {e}"))?;
        let n = v.as_i64().or_else(|| {
            ["label", "cls", "class"]
                .iter()
                .find_map(|k| v.get(k).and_then(|x| x.as_i64()))
        });
        return Ok(n);
    }
    Ok(None)
}

fn finish(p: Pending, source: &str, labels: Labels) -> SourceEvent {
    let skip = |reason: String| {
        SourceEvent::Skip(Skip {
            source: source.to_string(),
            key: p.key.clone(),
            offset: p.offset,
            reason,
        })
    };
    let Some((ext, image)) = &p.image else {
        return skip(if p.not_regular {
            "not a regular file (link or special member)".into()
        } else {
            "sample has no image member".into()
        });
    };
    if image.is_empty() {
        return skip("empty image member".into());
    }
    let label = match parse_label(&p) {
        Ok(l) => l,
        Err(e) => return skip(e),
    };
    if label.is_none() && labels == Labels::Required {
        return skip("no .cls member (a labeled dataset needs one)".into());
    }
    SourceEvent::Sample(RawSample {
        key: p.key.clone(),
        label,
        image: image.clone(),
        ext: ext.clone(),
        source: source.to_string(),
        offset: p.offset,
    })
}

/// Stream one WebDataset shard. Returns `false` if `f` asked to stop.
pub fn read_webdataset_shard(
    path: &Path,
    labels: Labels,
    f: &mut dyn FnMut(SourceEvent) -> bool,
) -> bool {
    let source = path.display().to_string();
    let fail = |offset: Option<u64>, message: String| {
        SourceEvent::ShardFailed(ShardFailure {
            source: source.clone(),
            offset,
            message,
        })
    };
    let stream = match super::archive::open_tar_stream(path) {
        Ok(x) => x,
        Err(e) => return f(fail(None, format!("cannot open: {e}"))),
    };
    // gzip: the file's length is not the tar's (a cut stream fails in the decoder instead)
    let file_len = if stream.gzip {
        u64::MAX
    } else {
        crate::storage::size_of(path).ok().flatten().unwrap_or(0)
    };
    let mut ar = tar::Archive::new(stream.reader);
    let entries = match ar.entries() {
        Ok(e) => e,
        Err(e) => return f(fail(Some(0), format!("not a tar file: {e}"))),
    };
    let mut cur: Option<Pending> = None;
    let mut last_end = 0u64;
    let mut members = 0usize;
    for entry in entries {
        let mut e = match entry {
            Ok(e) => e,
            Err(err) => {
                // Samples completed before the damage are delivered first.
                if let Some(p) = cur.take() {
                    if !f(finish(p, &source, labels)) {
                        return false;
                    }
                }
                let what = if members == 0 {
                    "not a tar file"
                } else {
                    "corrupt or truncated tar"
                };
                return f(fail(Some(last_end), format!("{what}: {err}")));
            }
        };
        members += 1;
        let offset = e.raw_header_position();
        let etype = e.header().entry_type();
        if etype.is_dir() {
            continue;
        }
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let (key, ext) = key_and_ext(&name);
        if cur.as_ref().is_some_and(|p| p.key != key) {
            let p = cur.take().expect("checked");
            if !f(finish(p, &source, labels)) {
                return false;
            }
        }
        let p = cur.get_or_insert_with(|| Pending {
            key: key.clone(),
            offset,
            ..Default::default()
        });
        if !etype.is_file() {
            p.not_regular = true;
            continue;
        }
        let size = e.size();
        let buf = match read_whole(&mut e, size) {
            Ok(b) => b,
            // The sample being read is incomplete: it is part of the shard failure.
            Err(why) => {
                return f(fail(
                    Some(offset),
                    format!("truncated tar: member {name:?} cut short ({why})"),
                ))
            }
        };
        last_end = e.raw_file_position() + e.size().div_ceil(512) * 512;
        p.add(&ext, buf);
    }
    if let Some(p) = cur.take() {
        if !f(finish(p, &source, labels)) {
            return false;
        }
    }
    match end_of_archive(members, file_len, last_end) {
        Some((offset, message)) => f(fail(Some(offset), message.into())),
        None => true,
    }
}

/// All `size` bytes of a member, or why not.
fn read_whole(e: &mut impl Read, size: u64) -> std::result::Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(size as usize);
    match e.read_to_end(&mut buf) {
        Err(err) => Err(err.to_string()),
        Ok(n) if n as u64 != size => Err(format!("{n} of {size} bytes")),
        Ok(_) => Ok(buf),
    }
}

/// What is wrong with how a tar ended, if anything: no members at all (an empty file, text, a
/// tar of end blocks only: a failed input, not a silent success), or a file that stops right
/// after a member (a complete tar ends with two zero blocks: it was cut at a member boundary).
fn end_of_archive(members: usize, file_len: u64, last_end: u64) -> Option<(u64, &'static str)> {
    if members == 0 {
        return Some((0, "no tar members: an empty file or not a tar archive"));
    }
    if file_len.saturating_sub(last_end) < 1024 {
        return Some((
            last_end,
            "truncated tar: no end-of-archive blocks after the last member",
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_first_dot_of_basename() {
        assert_eq!(
            key_and_ext("a/b.c/d.e.JPG"),
            ("a/b.c/d".into(), "e.jpg".into())
        );
        assert_eq!(key_and_ext("n01_1.jpg"), ("n01_1".into(), "jpg".into()));
        assert_eq!(key_and_ext("../../x.cls"), ("../../x".into(), "cls".into()));
        assert_eq!(key_and_ext("noext"), ("noext".into(), "".into()));
    }
}
