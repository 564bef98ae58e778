//! Downloads for a fresh online machine (the quickstart's Imagenette archive): into a cache
//! directory, with a progress bar, resumed from where a cut download stopped (HTTP `Range`),
//! checked against a known MD5 before it is used, and renamed into place only when complete
//! (`NAME.part` until then). Offline, the error says what was tried.

use crate::{Error, Result};
use md5::{Digest, Md5};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// fast.ai's Imagenette at 160 px: an ImageFolder (`imagenette2-160/{train,val}/<wnid>/`) in a
/// .tgz, ~94 MB; MD5 as torchvision's `Imagenette` dataset checks it.
pub const IMAGENETTE_160_URL: &str =
    "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz";
pub const IMAGENETTE_160_MD5: &str = "e793b78cc4c9e9a4ccc0c1155377a412";

/// The cache directory: `$LMD_CACHE`, else `$XDG_CACHE_HOME/lmd`, else `~/.cache/lmd`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LMD_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lmd");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/lmd"))
        .unwrap_or_else(|| PathBuf::from(".lmd-cache"))
}

fn md5_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `dir/NAME` for `url`, downloaded unless it is already there with `md5`.
pub fn fetch(url: &str, dir: &Path, md5: &str, show_progress: bool) -> Result<PathBuf> {
    let name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("download");
    let dest = dir.join(name);
    if dest.is_file() && md5_of(&dest).map_err(|e| Error::io(&dest, "read", e))? == md5 {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
    let part = dir.join(format!("{name}.part"));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let fail = |detail: String| {
        Error::Invalid(format!(
            "cannot download {url} into {}: {detail}",
            dir.display()
        ))
    };
    let mut req = ureq::get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = req.call().map_err(|e| fail(e.to_string()))?;
    let resumed = have > 0 && resp.status() == 206;
    let total = resp
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + if resumed { have } else { 0 });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&part)
        .map_err(|e| Error::io(&part, "open", e))?;
    let bar = if show_progress {
        indicatif::ProgressBar::new(total.unwrap_or(0))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {name}"));
    bar.set_position(if resumed { have } else { 0 });
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf).map_err(|e| {
            fail(format!(
                "cut at byte {}: {e} (rerun to resume)",
                bar.position()
            ))
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| Error::io(&part, "write", e))?;
        bar.inc(n as u64);
    }
    file.sync_all().map_err(|e| Error::io(&part, "sync", e))?;
    bar.finish_and_clear();
    let got = md5_of(&part).map_err(|e| Error::io(&part, "read", e))?;
    if got != md5 {
        let _ = std::fs::remove_file(&part);
        return Err(fail(format!(
            "MD5 {got}, expected {md5}: removed, rerun to download again"
        )));
    }
    std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, "rename", e))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    #[test]
    fn md5_matches_the_reference_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            super::md5_of(&p).unwrap(),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }
}
