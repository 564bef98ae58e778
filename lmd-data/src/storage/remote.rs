//! Remote locations through `object_store`, on this module's tokio runtime (see the parent
//! module's rules). One client per `scheme://bucket`, built once from the environment.

use super::{ObjectInfo, IO_THREADS, MULTIPART_BYTES, READ_AHEAD_CHUNKS};
use crate::{Error, Result};
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // reqwest is built without a TLS provider of its own: use ring's (ureq's too)
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("lmd-io")
            .enable_all()
            .build()
            .expect("the I/O runtime starts")
    })
}

/// An error of the store (or URL parser) at `url`, with each cause in its chain said once
/// ([`one_line`]): the root cause (e.g. `Connection refused`) is the last part.
fn storage_err(url: &str, op: &'static str, e: impl std::error::Error) -> Error {
    storage_msg(url, op, one_line(&e))
}

fn storage_msg(url: &str, op: &'static str, detail: String) -> Error {
    Error::Storage {
        url: url.to_string(),
        op,
        detail,
    }
}

/// How long requests are retried: object_store's backoff, bounded so that a vanished server
/// is reported in about a minute (`LMD_STORAGE_RETRY_S` overrides, for tests and slow links).
fn retry_config() -> RetryConfig {
    let secs = std::env::var("LMD_STORAGE_RETRY_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(60.0);
    RetryConfig {
        max_retries: 10,
        retry_timeout: Duration::from_secs_f64(secs.max(0.0)),
        ..Default::default()
    }
}

/// The store serving `url` and the object's path in it.
fn resolve(url: &str) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let parsed = url::Url::parse(url).map_err(|e| storage_err(url, "parse URL", e))?;
    let scheme = parsed.scheme().to_ascii_lowercase();
    let host = parsed.host_str().unwrap_or_default().to_string();
    let root = match parsed.port() {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    };
    let key = parsed.path().trim_start_matches('/');
    let key = percent_decode(key);
    let path = ObjPath::parse(&key).map_err(|e| storage_err(url, "parse URL", e))?;
    let mut stores = STORES.get_or_init(Default::default).lock().expect("lock");
    if let Some(s) = stores.get(&root) {
        return Ok((s.clone(), path));
    }
    let _rt = runtime().enter();
    let store: Arc<dyn ObjectStore> = match scheme.as_str() {
        "s3" | "s3a" => {
            let b = object_store::aws::AmazonS3Builder::from_env()
                .with_url(root.clone())
                .with_retry(retry_config());
            let plain = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .is_ok_and(|e| e.starts_with("http://"));
            let b = if plain { b.with_allow_http(true) } else { b };
            Arc::new(b.build().map_err(|e| storage_err(url, "configure", e))?)
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(root.clone())
                .with_retry(retry_config())
                .build()
                .map_err(|e| storage_err(url, "configure", e))?,
        ),
        "az" | "adl" | "azure" | "abfs" | "abfss" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(root.clone())
                .with_retry(retry_config())
                .build()
                .map_err(|e| storage_err(url, "configure", e))?,
        ),
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(root.clone())
                .with_retry(retry_config())
                .with_client_options(
                    object_store::ClientOptions::new().with_allow_http(scheme == "http"),
                )
                .build()
                .map_err(|e| storage_err(url, "configure", e))?,
        ),
        other => {
            return Err(storage_msg(
                url,
                "open",
                format!("unsupported scheme {other:?}"),
            ))
        }
    };
    stores.insert(root, store.clone());
    Ok((store, path))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL of `path` in the store whose root is that of `like`.
fn url_of(like: &str, path: &ObjPath) -> PathBuf {
    let parsed = url::Url::parse(like).expect("parsed before");
    let mut root = format!(
        "{}://{}",
        parsed.scheme(),
        parsed.host_str().unwrap_or_default()
    );
    if let Some(p) = parsed.port() {
        root.push_str(&format!(":{p}"));
    }
    PathBuf::from(format!("{root}/{path}"))
}

pub(super) fn get(url: &str) -> Result<Option<Vec<u8>>> {
    let (store, path) = resolve(url)?;
    runtime().block_on(async {
        match store.get(&path).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| storage_err(url, "read", e))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_err(url, "read", e)),
        }
    })
}

pub(super) fn head(url: &str) -> Result<Option<u64>> {
    let (store, path) = resolve(url)?;
    runtime().block_on(async {
        match store.head(&path).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_err(url, "stat", e)),
        }
    })
}

pub(super) fn put(url: &str, bytes: Vec<u8>) -> Result<()> {
    let (store, path) = resolve(url)?;
    runtime().block_on(async {
        store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| storage_err(url, "write", e))
    })
}

/// Upload a local file: one PUT when small, else a multipart upload completed last (aborted
/// on failure), so the object appears only whole.
pub(super) fn upload(src: &Path, url: &str) -> Result<()> {
    let len = std::fs::metadata(src)
        .map_err(|e| Error::io(src, "stat", e))?
        .len();
    if len < MULTIPART_BYTES as u64 {
        let bytes = std::fs::read(src).map_err(|e| Error::io(src, "read", e))?;
        return put(url, bytes);
    }
    let (store, path) = resolve(url)?;
    let mut f = std::fs::File::open(src).map_err(|e| Error::io(src, "open", e))?;
    runtime().block_on(async {
        let upload = store
            .put_multipart(&path)
            .await
            .map_err(|e| storage_err(url, "start upload", e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_BYTES);
        let mut buf = vec![0u8; MULTIPART_BYTES];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(src, "read", e))?;
            if n == 0 {
                break;
            }
            if let Err(e) = w.wait_for_capacity(4).await {
                return Err(storage_err(url, "upload", e));
            }
            w.write(&buf[..n]);
        }
        w.finish()
            .await
            .map(|_| ())
            .map_err(|e| storage_err(url, "complete upload", e))
    })
}

pub(super) fn delete(url: &str) -> Result<()> {
    let (store, path) = resolve(url)?;
    runtime().block_on(async {
        match store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err(url, "remove", e)),
        }
    })
}

pub(super) fn list(prefix: &str) -> Result<Vec<ObjectInfo>> {
    let (store, path) = resolve(prefix)?;
    // object_store lists whole path segments: list the directory and filter by the rest
    let raw = path.as_ref();
    let (dir, stem) = match raw.rfind('/') {
        Some(i) if !raw.ends_with('/') => (&raw[..i], &raw[i + 1..]),
        _ => (raw.trim_end_matches('/'), ""),
    };
    let dir = ObjPath::from(dir);
    let want = if stem.is_empty() {
        None
    } else {
        Some(format!(
            "{}{stem}",
            if dir.as_ref().is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            }
        ))
    };
    let mut out = runtime().block_on(async {
        let mut s = store.list(if dir.as_ref().is_empty() {
            None
        } else {
            Some(&dir)
        });
        let mut v = Vec::new();
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| storage_err(prefix, "list", e))?;
            if want
                .as_ref()
                .is_none_or(|w| m.location.as_ref().starts_with(w.as_str()))
            {
                v.push(ObjectInfo {
                    location: url_of(prefix, &m.location),
                    size: m.size,
                });
            }
        }
        Ok::<_, Error>(v)
    })?;
    out.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(out)
}

pub(super) fn check_access(url: &str) -> Result<()> {
    let (store, path) = resolve(url)?;
    let parsed = url::Url::parse(url).expect("parsed");
    if matches!(parsed.scheme(), "http" | "https") {
        // plain HTTP servers cannot list: a HEAD of the object itself
        return runtime().block_on(async {
            match store.head(&path).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(storage_err(url, "check access", e)),
            }
        });
    }
    let parent = match path.as_ref().rfind('/') {
        Some(i) => ObjPath::from(&path.as_ref()[..i]),
        None => ObjPath::from(""),
    };
    runtime().block_on(async {
        let mut s = store.list(Some(&parent));
        match s.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(storage_err(url, "check access", e)),
        }
    })
}

/// An error and its sources on one line, each said once: object_store's errors nest the
/// server's XML reply (the first line of each level is kept), and most levels repeat the text
/// of the level below (`Generic S3 error: Error performing GET ... - HTTP error: ...` over
/// `Error performing GET ... - HTTP error: ...`), so a level already said is left out. The
/// root cause (`Connection refused`, the server's `NoSuchBucket`) stays, last.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut said = String::new();
    let mut level = Some(e);
    while let Some(l) = level {
        let text = l.to_string();
        let text = text.lines().next().unwrap_or("").trim();
        if !text.is_empty() && !said.contains(text) {
            if !said.is_empty() {
                said.push_str(": ");
            }
            said.push_str(text);
        }
        level = l.source();
    }
    said
}

/// A streaming GET: a task on the I/O runtime pushes body chunks into a bounded queue; `read`
/// takes them in order. Dropping the reader closes the queue, which ends the task.
pub(super) struct RemoteReader {
    url: String,
    rx: async_channel::Receiver<std::result::Result<bytes::Bytes, String>>,
    chunk: bytes::Bytes,
    offset: u64,
}

impl RemoteReader {
    pub(super) fn open(url: &str) -> Result<Self> {
        let (store, path) = resolve(url)?;
        let (tx, rx) = async_channel::bounded(READ_AHEAD_CHUNKS);
        // the GET itself (status, headers) is awaited here, so a missing object is an open error
        let result = runtime().block_on(store.get(&path)).map_err(|e| {
            let detail = one_line(&e);
            if !matches!(e, object_store::Error::NotFound { .. }) {
                super::record_fault(url, "open", detail.clone());
            }
            storage_msg(url, "open", detail)
        })?;
        runtime().spawn(async move {
            let mut body = result.into_stream();
            while let Some(c) = body.next().await {
                let item = c.map_err(|e| one_line(&e));
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(RemoteReader {
            url: url.to_string(),
            rx,
            chunk: bytes::Bytes::new(),
            offset: 0,
        })
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.recv_blocking() {
                Ok(Ok(c)) => self.chunk = c,
                Ok(Err(e)) => {
                    let detail = format!("at byte {}: {e}", self.offset);
                    super::record_fault(&self.url, "read", detail.clone());
                    return Err(std::io::Error::other(format!(
                        "{}: read {detail}",
                        self.url
                    )));
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain whose levels each repeat the level below (as object_store's do).
    #[derive(Debug)]
    struct Level(String, Option<Box<Level>>);
    impl std::fmt::Display for Level {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Level {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn one_line_says_each_level_once_and_keeps_the_first_line_of_each() {
        let chain = [
            "Generic S3 error: GET x - HTTP error: sending",
            "GET x - HTTP error: sending",
            "HTTP error: sending",
            "sending",
            "<Error>\n<Code>NoSuchBucket</Code>",
            "refused",
        ];
        let mut e: Option<Box<Level>> = None;
        for t in chain.iter().rev() {
            e = Some(Box::new(Level(t.to_string(), e)));
        }
        assert_eq!(
            one_line(e.as_deref().unwrap()),
            "Generic S3 error: GET x - HTTP error: sending: <Error>: refused"
        );
    }

    /// Regression: a GET from a server that is not there said its cause five times over
    /// ("Error performing GET ..." twice, "error sending request" four times) and, where only
    /// the top level was printed, lost it ("Connection refused").
    #[test]
    fn a_refused_connection_is_named_once_with_its_root_cause() {
        let _rt = runtime().enter();
        let store = object_store::http::HttpBuilder::new()
            .with_url("http://127.0.0.1:9")
            .with_retry(RetryConfig {
                max_retries: 1,
                retry_timeout: Duration::from_millis(100),
                ..Default::default()
            })
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .build()
            .unwrap();
        let Err(e) = runtime().block_on(store.get(&ObjPath::from("a.tar"))) else {
            panic!("nothing listens on port 9")
        };
        let msg = storage_err("http://127.0.0.1:9/a.tar", "open", e).to_string();
        assert!(msg.contains("http://127.0.0.1:9/a.tar"), "{msg}");
        assert!(msg.contains("Connection refused"), "{msg}");
        assert_eq!(msg.matches("Error performing GET").count(), 1, "{msg}");
        assert_eq!(msg.matches("error sending request").count(), 1, "{msg}");
    }
}
