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
    // a server that stops answering fails the download instead of hanging it
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(60))
        .build();
    let mut req = agent.get(url);
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
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Mutex};

    /// A loopback HTTP/1.1 server for `body` that honours `Range: bytes=N-` and, on the first
    /// request only, announces the whole length but closes the connection halfway. Returns
    /// its URL and the Range headers it saw (None: a plain GET).
    fn server(body: Vec<u8>) -> (String, Arc<Mutex<Vec<Option<u64>>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/imagenette2-160.tgz", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().enumerate() {
                let mut c = conn.unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut from = None;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = v.trim().trim_end_matches('-').parse::<u64>().ok();
                    }
                }
                seen2.lock().unwrap().push(from);
                let start = from.unwrap_or(0) as usize;
                let rest = &body[start..];
                let status = if from.is_some() {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                );
                let _ = c.write_all(head.as_bytes());
                let send = if i == 0 {
                    &rest[..rest.len() / 2]
                } else {
                    rest
                };
                let _ = c.write_all(send);
                let _ = c.flush();
            }
        });
        (url, seen)
    }

    fn md5_hex(b: &[u8]) -> String {
        use md5::{Digest, Md5};
        Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_cut_download_resumes_from_its_part_file_and_is_checked() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (url, seen) = server(body.clone());
        let dir = tempfile::tempdir().unwrap();
        let md5 = md5_hex(&body);
        let e = super::fetch(&url, dir.path(), &md5, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&url) && e.contains("cut at byte"), "{e}");
        let part = dir.path().join("imagenette2-160.tgz.part");
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 150_000);
        assert!(
            !dir.path().join("imagenette2-160.tgz").exists(),
            "incomplete never takes the name"
        );
        let p = super::fetch(&url, dir.path(), &md5, false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert!(!part.exists());
        assert_eq!(*seen.lock().unwrap(), vec![None, Some(150_000)]);
        // complete and checked: no request at all
        super::fetch(&url, dir.path(), &md5, false).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_download_with_the_wrong_checksum_is_removed() {
        let body = vec![5u8; 10_000];
        let (url, _) = server(body);
        let dir = tempfile::tempdir().unwrap();
        let _ = super::fetch(&url, dir.path(), "00", false); // the cut first request
        let e = super::fetch(&url, dir.path(), "00", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MD5") && e.contains("expected 00"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

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
