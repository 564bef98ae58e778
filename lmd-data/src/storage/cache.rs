//! A local cache of remote latent datasets: training reads `s3://.../latents` from local
//! memory-mapped copies, fetched once and reused across epochs and runs.
//!
//! Layout: `CACHE/<xxh3 of the URL>/` holds the dataset's shards under their own names and its
//! `index.json`, written last. Rules:
//! - The remote manifest is read on every open (one GET); a shard whose local copy has the
//!   manifest's size is used as is (it was verified when it arrived), any other is fetched
//!   (to a temporary, its XXH3-128 checked against the manifest, then renamed into place).
//! - Each use touches the shard's modification time; when the cache holds more than its limit,
//!   the least recently used shards not in use are deleted first.
//! - A dataset that fits under the limit is mirrored whole when it is opened ([`Cache::mirror`]).
//!   One that does not is *streamed* ([`crate::shard::LatentDataset::discover_cached`]): its
//!   shards are fetched one at a time ([`Cache::fetch_shard`]) ahead of the loader, which then
//!   reads the shards in groups of at most half the limit (see [`crate::loader`]), so one group
//!   is read while the next arrives.

use super::{join, read};
use crate::shard::{Manifest, ShardEntry, MANIFEST_FILE};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where remote datasets are cached, and how much they may take (bytes; 0: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    pub dir: PathBuf,
    pub limit: u64,
}

/// What opening one remote dataset through the cache did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Shards served from the cache.
    pub hits: usize,
    /// Shards fetched.
    pub fetched: usize,
    pub bytes_fetched: u64,
    /// Shards of other datasets deleted to stay under the limit.
    pub evicted: usize,
}

impl CacheStats {
    /// Both counts together.
    pub fn add(&mut self, o: CacheStats) {
        self.hits += o.hits;
        self.fetched += o.fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.evicted += o.evicted;
    }
}

impl Default for Cache {
    /// `$LMD_CACHE_DIR`, else `$XDG_CACHE_HOME/lmd/shards`, else `~/.cache/lmd/shards`; limit
    /// `$LMD_CACHE_LIMIT` (e.g. `200G`), else none.
    fn default() -> Self {
        let dir = std::env::var_os("LMD_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lmd/shards"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lmd/shards"))
            })
            .unwrap_or_else(|| std::env::temp_dir().join("lmd-cache"));
        let limit = std::env::var("LMD_CACHE_LIMIT")
            .ok()
            .and_then(|v| parse_size(&v).ok())
            .unwrap_or(0);
        Cache { dir, limit }
    }
}

/// `123`, `64K`, `500M`, `200G`, `1.5T` (powers of 1024) as bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (K, M, G, T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional K/M/G/T"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("size {s:?}: negative"));
    }
    Ok((v * mult as f64) as u64)
}

impl Cache {
    /// Where the remote dataset `url` (a prefix holding `index.json`) lives in the cache, and
    /// its manifest (read from `url`: one GET) with the manifest's bytes.
    pub fn remote(&self, url: &Path) -> Result<(PathBuf, Manifest, Vec<u8>)> {
        let name = format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(url.to_string_lossy().as_bytes())
        );
        let local = self.dir.join(name);
        std::fs::create_dir_all(&local).map_err(|e| Error::io(&local, "create directory", e))?;
        let murl = join(url, MANIFEST_FILE);
        let bytes = read(&murl)?;
        let m = Manifest::from_slice(&murl, &bytes)?;
        Ok((local, m, bytes))
    }

    /// The local copy of the remote dataset `url`, brought up to date (see the module rules).
    pub fn mirror(&self, url: &Path) -> Result<(PathBuf, CacheStats)> {
        let (local, m, bytes) = self.remote(url)?;
        if self.limit > 0 && m.bytes > self.limit {
            return Err(Error::InvalidInput {
                context: url.display().to_string(),
                detail: format!(
                    "the dataset takes {} bytes, more than the cache limit of {} bytes \
                     (raise --cache-limit)",
                    m.bytes, self.limit
                ),
            });
        }
        let mut st = CacheStats::default();
        let keep: Vec<PathBuf> = m.shards.iter().map(|s| local.join(&s.file)).collect();
        // room first, so the fetches do not overshoot the limit
        st.evicted = self.evict(&keep, m.bytes)?;
        for (s, lp) in m.shards.iter().zip(&keep) {
            if self.fetch_verified(&join(url, &s.file), s, lp)? {
                st.fetched += 1;
                st.bytes_fetched += s.bytes;
            } else {
                st.hits += 1;
            }
        }
        crate::shard::writer::write_atomic(&local.join(MANIFEST_FILE), &bytes)?;
        Ok((local, st))
    }

    /// Make `lp` a verified copy of the shard `src` (manifest entry `s`), after evicting
    /// least-recently-used shards other than `keep` (whose bytes count as in use) to make
    /// room for it. Returns the stats of this one shard.
    pub fn fetch_shard(
        &self,
        src: &Path,
        s: &ShardEntry,
        lp: &Path,
        keep: &[PathBuf],
    ) -> Result<CacheStats> {
        let mut st = CacheStats::default();
        if std::fs::metadata(lp).map(|x| x.len()).ok() != Some(s.bytes) {
            let mut keep = keep.to_vec();
            keep.push(lp.to_path_buf());
            let in_use: u64 = keep
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.len()))
                .sum();
            st.evicted = self.evict(&keep, in_use + s.bytes)?;
        }
        if self.fetch_verified(src, s, lp)? {
            st.fetched = 1;
            st.bytes_fetched = s.bytes;
        } else {
            st.hits = 1;
        }
        Ok(st)
    }

    /// Fetch `src` to `lp` unless a copy of the listed size is there (it was verified when it
    /// arrived): to a temporary, checked against the entry's size and XXH3-128, then renamed.
    /// Touches the copy either way; true when it was fetched.
    fn fetch_verified(&self, src: &Path, s: &ShardEntry, lp: &Path) -> Result<bool> {
        let have = std::fs::metadata(lp).map(|x| x.len()).ok();
        let fetched = have != Some(s.bytes);
        if fetched {
            let tmp = crate::shard::writer::temp_name(lp);
            super::download(src, &tmp)?;
            let data = std::fs::read(&tmp).map_err(|e| Error::io(&tmp, "read", e))?;
            let sum = format!("{:032x}", crate::shard::format::checksum128(&data));
            if sum != s.xxh3_128 || data.len() as u64 != s.bytes {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Storage {
                    url: src.display().to_string(),
                    op: "verify",
                    detail: format!(
                        "{} bytes, XXH3-128 {sum}; the manifest says {} bytes, {}",
                        data.len(),
                        s.bytes,
                        s.xxh3_128
                    ),
                });
            }
            std::fs::rename(&tmp, lp).map_err(|e| Error::io(lp, "rename", e))?;
        }
        touch(lp);
        Ok(fetched)
    }

    /// Delete least-recently-used shards (not in `keep`) until `incoming` more bytes fit.
    fn evict(&self, keep: &[PathBuf], incoming: u64) -> Result<usize> {
        if self.limit == 0 {
            return Ok(0);
        }
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut kept = 0u64;
        for d in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let p = f.path();
                if p.extension().is_none_or(|e| e != "lmds") {
                    continue;
                }
                let Ok(md) = f.metadata() else { continue };
                if keep.contains(&p) {
                    kept += md.len();
                    continue;
                }
                let t = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((t, md.len(), p));
            }
        }
        files.sort();
        let mut total = kept + files.iter().map(|f| f.1).sum::<u64>();
        // what is already here of this dataset counts once
        let need = incoming.saturating_sub(kept);
        let mut n = 0;
        for (_, len, p) in files {
            if total + need <= self.limit {
                break;
            }
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, "evict", e))?;
            total -= len;
            n += 1;
        }
        Ok(n)
    }
}

/// Mark `p` as just used (its modification time orders eviction).
pub(crate) fn touch(p: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(p) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::synthetic::{write_dataset, SyntheticSpec};

    fn dataset(dir: &Path, seed: u64) -> u64 {
        let m = write_dataset(
            dir,
            &SyntheticSpec {
                records: 64,
                records_per_shard: 16,
                seed,
                ..Default::default()
            },
        )
        .unwrap();
        m.bytes
    }

    // The cache reads its source through `storage`, so a local directory stands in for a
    // remote prefix here; tests/object_store.rs runs the same code against an S3 server.
    #[test]
    fn a_second_open_is_served_from_the_cache_and_a_corrupt_arrival_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        dataset(&src, 1);
        let c = Cache {
            dir: t.path().join("cache"),
            limit: 0,
        };
        let (local, st) = c.mirror(&src).unwrap();
        assert_eq!((st.fetched, st.hits), (4, 0));
        let (again, st) = c.mirror(&src).unwrap();
        assert_eq!((again, st.fetched, st.hits), (local.clone(), 0, 4));
        assert_eq!(crate::shard::LatentDataset::open(&local).unwrap().len(), 64);
        // damage one shard at the source (same size) and drop the cached copy
        let victim = src.join("shard-000002.lmds");
        let mut b = std::fs::read(&victim).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(&victim, b).unwrap();
        std::fs::remove_file(local.join("shard-000002.lmds")).unwrap();
        let e = c.mirror(&src).unwrap_err().to_string();
        assert!(
            e.contains("shard-000002.lmds") && e.contains("verify"),
            "{e}"
        );
        assert!(!local.join("shard-000002.lmds").exists());
    }

    #[test]
    fn least_recently_used_datasets_make_room_and_one_too_large_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let size = dataset(&a, 1).max(dataset(&b, 2));
        // room for one dataset and half of another
        let mut c = Cache {
            dir: t.path().join("cache"),
            limit: size + size / 2,
        };
        let (la, _) = c.mirror(&a).unwrap();
        let (lb, st) = c.mirror(&b).unwrap();
        assert_eq!(st.fetched, 4);
        assert!(st.evicted >= 2, "{st:?}");
        let left = (0..4)
            .filter(|i| la.join(format!("shard-{i:06}.lmds")).exists())
            .count();
        assert!(left <= 2, "{left} shards of a kept");
        assert!((0..4).all(|i| lb.join(format!("shard-{i:06}.lmds")).exists()));
        c.limit = size / 2;
        let e = c.mirror(&a).unwrap_err().to_string();
        assert!(e.contains("cache limit"), "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("x").is_err());
    }
}
