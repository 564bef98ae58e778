//! Where bytes live: local paths and object-store URLs behind one small interface.
//!
//! A location is a string: `s3://BUCKET/KEY`, `gs://BUCKET/KEY`, `az://CONTAINER/KEY` (also
//! `abfs(s)://`, `adl://`), `http(s)://HOST/PATH` (read-only), or else a local path. Paths are
//! carried as [`std::path::Path`] through the rest of lmd-data (a URL is a valid path string);
//! [`Location::of`] is the one place that tells them apart.
//!
//! Remote locations go through the `object_store` crate (feature `object-store`, on by default):
//! credentials, region and endpoint come from each provider's standard environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! ...). The network I/O runs on one tokio runtime of [`IO_THREADS`] threads, owned by this
//! module and by nothing else; callers stay synchronous (decoding runs on plain threads).
//!
//! Rules:
//! - A read streams: [`open_read`] hands out a `Read` fed by a bounded queue of at most
//!   [`READ_AHEAD_CHUNKS`] body chunks, so a tar is never downloaded whole first. A body cut
//!   mid-way is resumed by `object_store` from the remaining range, guarded by the ETag (an
//!   object replaced meanwhile is an error, not a splice); after the retries the error names the
//!   URL and the byte offset reached.
//! - A write is atomic: an object appears under its name only once its upload completed (a
//!   single PUT, or a multipart upload completed last); a failed upload is aborted.
//! - Bad credentials or a missing bucket are found by [`check_access`], before any work.

pub(crate) mod cache;
#[cfg(feature = "object-store")]
mod remote;

pub use cache::{parse_size, Cache, CacheStats};

use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Threads of the I/O runtime (network only: enough to keep a few streams and uploads busy).
pub const IO_THREADS: usize = 2;
/// Body chunks buffered ahead of a streaming reader (each as the server sends it, typically
/// 8-64 KiB; object_store's chunks are bounded by the HTTP frames).
pub const READ_AHEAD_CHUNKS: usize = 256;
/// Objects at least this large are uploaded in parts of this size (S3's parts are 5 MiB-5 GiB).
pub const MULTIPART_BYTES: usize = 16 << 20;

/// URL schemes read and written through object stores.
const SCHEMES: [&str; 9] = [
    "s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http",
];

/// The first transport failure of a streaming read in this process (after its retries): a
/// source reports it like a damaged shard, but it says nothing of the data, so a job that must
/// not skip good samples (precompute) stops on it before committing anything more.
static FAULT: std::sync::Mutex<Option<(String, &'static str, String)>> =
    std::sync::Mutex::new(None);

#[cfg_attr(not(feature = "object-store"), allow(dead_code))]
pub(crate) fn record_fault(url: &str, op: &'static str, detail: String) {
    let mut f = FAULT.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        *f = Some((url.to_string(), op, detail));
    }
}

/// The first transport failure recorded by a streaming read (see [`open_read`]), as an error
/// naming the URL and the byte offset.
pub fn first_fault() -> Option<Error> {
    let f = FAULT.lock().unwrap_or_else(|p| p.into_inner());
    f.as_ref().map(|(url, op, detail)| Error::Storage {
        url: url.clone(),
        op,
        detail: detail.clone(),
    })
}

/// A local path or a remote URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    Local(&'a Path),
    Remote(&'a str),
}

impl<'a> Location<'a> {
    /// Tell a URL (one of the schemes in the module doc, or `https`) from a local path.
    pub fn of(path: &'a Path) -> Location<'a> {
        match path.to_str() {
            Some(s) if is_url(s) => Location::Remote(s),
            _ => Location::Local(path),
        }
    }
}

/// Whether `s` is a remote URL (not a local path).
pub fn is_url(s: &str) -> bool {
    match s.split_once("://") {
        Some((scheme, _)) => {
            let scheme = scheme.to_ascii_lowercase();
            scheme == "https" || SCHEMES.contains(&scheme.as_str())
        }
        None => false,
    }
}

/// `base` joined with `name` (`/` for URLs, the platform's rule for paths).
pub fn join(base: &Path, name: &str) -> PathBuf {
    match Location::of(base) {
        Location::Remote(u) => PathBuf::from(format!("{}/{name}", u.trim_end_matches('/'))),
        Location::Local(p) => p.join(name),
    }
}

/// What a listing or a HEAD says of one object or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full URL (or path) of the object.
    pub location: PathBuf,
    pub size: u64,
}

#[cfg(not(feature = "object-store"))]
fn no_remote(url: &str) -> Error {
    Error::Storage {
        url: url.to_string(),
        op: "open",
        detail: "this build has no object-store support (rebuild with the default feature \
                 `object-store`)"
            .into(),
    }
}

/// Open `path` (a file or a URL) for streaming reads. A remote read that fails for good (the
/// server gone, the object replaced) returns an I/O error naming the URL and byte offset, and
/// records it for [`first_fault`].
pub fn open_read(path: &Path) -> Result<Box<dyn Read + Send>> {
    match Location::of(path) {
        Location::Local(p) => Ok(Box::new(
            std::fs::File::open(p).map_err(|e| Error::io(p, "open", e))?,
        )),
        #[cfg(feature = "object-store")]
        Location::Remote(u) => Ok(Box::new(remote::RemoteReader::open(u)?)),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// The whole content of `path`, or `None` when it does not exist.
pub fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match Location::of(path) {
        Location::Local(p) => match std::fs::read(p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(p, "read", e)),
        },
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::get(u),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// The whole content of `path`.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    read_opt(path)?.ok_or_else(|| {
        Error::io(
            path,
            "read",
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or object"),
        )
    })
}

/// The size of `path`, or `None` when it does not exist.
pub fn size_of(path: &Path) -> Result<Option<u64>> {
    match Location::of(path) {
        Location::Local(p) => match std::fs::metadata(p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(p, "stat", e)),
        },
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::head(u),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// Write `bytes` to `path` atomically (a temporary renamed into place, or one PUT).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    match Location::of(path) {
        Location::Local(p) => crate::shard::writer::write_atomic(p, bytes),
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::put(u, bytes.to_vec()),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// Copy the local file `src` to `dst` (a URL: uploaded in parts when large; a path: copied
/// through a temporary). `dst` appears complete or not at all.
pub fn upload(src: &Path, dst: &Path) -> Result<()> {
    match Location::of(dst) {
        Location::Local(p) => {
            let bytes = std::fs::read(src).map_err(|e| Error::io(src, "read", e))?;
            crate::shard::writer::write_atomic(p, &bytes)
        }
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::upload(src, u),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// Copy `src` (a URL or a path) to the local file `dst`, through a temporary renamed into
/// place; returns the bytes copied.
pub fn download(src: &Path, dst: &Path) -> Result<u64> {
    let tmp = crate::shard::writer::temp_name(dst);
    let res = (|| {
        let mut r = open_read(src)?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let n = std::io::copy(&mut r, &mut f).map_err(|e| Error::io(src, "download", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "sync", e))?;
        std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, "rename", e))?;
        Ok(n)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Remove `path` (no error when it is already gone).
pub fn remove(path: &Path) -> Result<()> {
    match Location::of(path) {
        Location::Local(p) => match std::fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(p, "remove", e)),
        },
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::delete(u),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// The objects under the URL prefix `prefix` (recursively), sorted by URL.
pub fn list(prefix: &str) -> Result<Vec<ObjectInfo>> {
    #[cfg(feature = "object-store")]
    {
        remote::list(prefix)
    }
    #[cfg(not(feature = "object-store"))]
    {
        Err(no_remote(prefix))
    }
}

/// Refuse, in one line, a remote location whose bucket is missing or whose credentials are
/// refused (a listing of its parent prefix); local paths pass.
pub fn check_access(path: &Path) -> Result<()> {
    match Location::of(path) {
        Location::Local(_) => Ok(()),
        #[cfg(feature = "object-store")]
        Location::Remote(u) => remote::check_access(u),
        #[cfg(not(feature = "object-store"))]
        Location::Remote(u) => Err(no_remote(u)),
    }
}

/// Expand glob wildcards in a URL by listing the prefix before the first wildcard.
pub(crate) fn glob_remote(pattern: &str) -> Result<Vec<PathBuf>> {
    let wild = pattern
        .find(['*', '?', '['])
        .expect("called with a wildcard");
    let prefix = &pattern[..pattern[..wild].rfind('/').map(|i| i + 1).unwrap_or(wild)];
    let pat = glob::Pattern::new(pattern).map_err(|e| Error::InvalidInput {
        context: pattern.to_string(),
        detail: format!("bad glob: {e}"),
    })?;
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    Ok(list(prefix)?
        .into_iter()
        .filter(|o| {
            o.location
                .to_str()
                .is_some_and(|s| pat.matches_with(s, opts))
        })
        .map(|o| o.location)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        for u in [
            "s3://b/k.tar",
            "S3://b/k",
            "gs://b/x",
            "az://c/x",
            "https://h/x",
            "http://127.0.0.1:9000/b/x",
        ] {
            assert!(is_url(u), "{u}");
            assert_eq!(Location::of(Path::new(u)), Location::Remote(u));
        }
        for p in [
            "/data/a.tar",
            "rel/x",
            "c:/x",
            "weird://no",
            "hf:owner/repo",
        ] {
            assert!(!is_url(p), "{p}");
        }
        assert_eq!(
            join(Path::new("s3://b/out/"), "index.json"),
            PathBuf::from("s3://b/out/index.json")
        );
        assert_eq!(join(Path::new("/tmp/x"), "y"), PathBuf::from("/tmp/x/y"));
    }

    #[test]
    fn local_files_read_write_and_vanish_through_the_same_calls() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.bin");
        assert_eq!(read_opt(&p).unwrap(), None);
        assert_eq!(size_of(&p).unwrap(), None);
        write(&p, b"hello").unwrap();
        assert_eq!(read(&p).unwrap(), b"hello");
        assert_eq!(size_of(&p).unwrap(), Some(5));
        let q = d.path().join("b.bin");
        assert_eq!(download(&p, &q).unwrap(), 5);
        let mut s = String::new();
        open_read(&q).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        remove(&q).unwrap();
        remove(&q).unwrap();
        assert!(!q.exists());
    }
}
