//! Bundles in an S3-compatible bucket (`[bucket]` on either agent): the
//! sender uploads each bundle whole, in order (one PUT, or a multipart upload
//! completed only after every part, aborted on failure); receivers list what
//! is newer than what they hold, download and verify it like anything that
//! arrives in their inbox, and never delete. Credentials: the AWS
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, …) or a shared
//! credentials file (`credentials_file`, `profile`); secrets never reach a
//! log line or an error message.

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// `[bucket]` in either agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// `s3://bucket/prefix` (the prefix may be empty).
    pub url: String,
    /// For a store that is not AWS: `http://127.0.0.1:9000`,
    /// `https://s3.example.org`. Path-style requests are used then.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// An AWS shared credentials file (`[profile]` sections with
    /// `aws_access_key_id` and `aws_secret_access_key`); without it, the
    /// environment.
    pub credentials_file: Option<PathBuf>,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Receivers: how often the bucket is asked for new bundles.
    #[serde(default = "default_poll", with = "crate::duration")]
    pub poll_interval: std::time::Duration,
    /// Sender: retention of the bucket (`ferry-sender prune-bucket`, and
    /// the daemon hourly). Keeps the newest this many completes of the
    /// current chain and everything after the oldest of them; unset: the
    /// sender never deletes (lifecycle rules may).
    #[serde(default)]
    pub keep_completes: Option<usize>,
    /// Sender: nothing younger than this is deleted.
    #[serde(default = "default_keep_for", with = "crate::duration")]
    pub keep_for: std::time::Duration,
}

fn default_keep_for() -> std::time::Duration {
    std::time::Duration::from_secs(2 * 86_400)
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_profile() -> String {
    "default".into()
}
fn default_poll() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// Objects larger than this go up as multipart uploads, in parts of this size.
pub const PART_BYTES: usize = 16 << 20;

/// Downloads of objects larger than this are split in ranges of this size…
pub const RANGE_BYTES: u64 = 4 << 20;
/// …of which this many are fetched at once (memory: about their product).
pub const RANGES_IN_FLIGHT: usize = 6;

/// An error against the bucket: what was done, on which object, and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{doing} {target}: {message}")]
pub struct BucketError {
    pub doing: String,
    pub target: String,
    pub message: String,
    /// Whether trying again later can help (the server was unreachable).
    pub transient: bool,
}

pub struct Bucket {
    store: Arc<AmazonS3>,
    prefix: ObjectPath,
    /// `s3://bucket/prefix`, for messages.
    pub url: String,
}

impl Bucket {
    /// Opens `cfg` (no request yet); the error names the key at fault.
    pub fn open(cfg: &BucketConfig) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rest = cfg
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("bucket.url {:?} is not s3://bucket/prefix", cfg.url))?;
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if name.is_empty() {
            return Err(format!("bucket.url {:?} names no bucket", cfg.url));
        }
        // ferry retries whole pushes and polls itself: the client gives up
        // on a request after a few quick tries instead of three minutes.
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: std::time::Duration::from_secs(15),
            ..Default::default()
        };
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(name)
            .with_region(&cfg.region)
            .with_retry(retry);
        if let Some(ep) = &cfg.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(file) = &cfg.credentials_file {
            let (id, secret) = read_credentials(file, &cfg.profile)?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| format!("bucket {}: {e}", cfg.url))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            url: format!("s3://{name}/{}", prefix.trim_matches('/')),
        })
    }

    fn path(&self, name: &str) -> ObjectPath {
        self.prefix.clone().join(name)
    }

    fn err(&self, doing: &str, name: &str, e: &object_store::Error) -> BucketError {
        let text = e.to_string();
        let (message, transient) = explain(&text);
        BucketError {
            doing: doing.to_owned(),
            target: format!("{}/{name}", self.url.trim_end_matches('/')),
            message,
            transient,
        }
    }

    /// Uploads `local` as `name`: whole or not at all.
    pub async fn upload(&self, local: &Path, name: &str) -> Result<u64, BucketError> {
        let io = |e: std::io::Error| BucketError {
            doing: "reading".into(),
            target: local.display().to_string(),
            message: e.to_string(),
            transient: false,
        };
        let size = std::fs::metadata(local).map_err(io)?.len();
        let path = self.path(name);
        let mut file = tokio::fs::File::open(local).await.map_err(io)?;
        if size <= PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf).await.map_err(io)?;
            self.store
                .put(&path, PutPayload::from(buf))
                .await
                .map_err(|e| self.err("uploading", name, &e))?;
            return Ok(size);
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.err("starting the multipart upload of", name, &e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        let result: Result<(), BucketError> = async {
            loop {
                // At most two parts in flight: memory stays near 3 parts.
                w.wait_for_capacity(2)
                    .await
                    .map_err(|e| self.err("uploading a part of", name, &e))?;
                let n = file.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                w.write(&buf[..n]);
            }
        }
        .await;
        match result {
            Ok(()) => {
                w.finish()
                    .await
                    .map_err(|e| self.err("completing the multipart upload of", name, &e))?;
                Ok(size)
            }
            Err(e) => {
                if let Err(abort) = w.abort().await {
                    tracing::warn!(object = name, error = %abort, "could not abort the multipart upload; a lifecycle rule for incomplete uploads removes it");
                }
                Err(e)
            }
        }
    }

    /// The objects under the prefix whose names sort after `after` (all of
    /// them without), with their sizes, in name order.
    pub async fn list_after(&self, after: Option<&str>) -> Result<Vec<(String, u64)>, BucketError> {
        Ok(self
            .list_dated(after)
            .await?
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect())
    }

    /// [`list_after`](Self::list_after) with each object's time of creation.
    pub async fn list_dated(
        &self,
        after: Option<&str>,
    ) -> Result<Vec<(String, u64, chrono::DateTime<chrono::Utc>)>, BucketError> {
        use futures_util::TryStreamExt;
        let stream = match after {
            Some(a) => self
                .store
                .list_with_offset(Some(&self.prefix), &self.path(a)),
            None => self.store.list(Some(&self.prefix)),
        };
        let metas: Vec<object_store::ObjectMeta> = stream
            .try_collect()
            .await
            .map_err(|e| self.err("listing", "", &e))?;
        let mut out: Vec<(String, u64, chrono::DateTime<chrono::Utc>)> = metas
            .into_iter()
            .filter_map(|m| Some((m.location.filename()?.to_owned(), m.size, m.last_modified)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Downloads `name` into `dest` (written whole under a temporary name,
    /// then renamed). A large object comes down as ranges of
    /// [`RANGE_BYTES`], [`RANGES_IN_FLIGHT`] at a time, each written at its
    /// offset, every range bound to the first one's ETag (an object replaced
    /// meanwhile fails the download instead of mixing two versions).
    pub async fn download(&self, name: &str, dest: &Path) -> Result<u64, BucketError> {
        use futures_util::{StreamExt, TryStreamExt};
        use object_store::{GetOptions, GetRange};
        let path = self.path(name);
        let tmp = crate::durable::temp_name(dest);
        let io = |e: std::io::Error| BucketError {
            doing: "writing".into(),
            target: tmp.display().to_string(),
            message: e.to_string(),
            transient: true,
        };
        let first = self
            .store
            .get_opts(
                &path,
                GetOptions {
                    range: Some(GetRange::Bounded(0..RANGE_BYTES)),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.err("downloading", name, &e))?;
        let size = first.meta.size;
        let etag = first.meta.e_tag.clone();
        let file = std::sync::Arc::new(std::fs::File::create(&tmp).map_err(io)?);
        let write_at = |data: bytes::Bytes, at: u64| {
            let file = std::sync::Arc::clone(&file);
            async move {
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&data, at)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
        };
        let result: Result<(), BucketError> = async {
            let head = first
                .bytes()
                .await
                .map_err(|e| self.err("downloading", name, &e))?;
            write_at(head, 0).await.map_err(io)?;
            let ranges = (RANGE_BYTES..size)
                .step_by(RANGE_BYTES as usize)
                .map(|at| at..(at + RANGE_BYTES).min(size));
            futures_util::stream::iter(ranges)
                .map(|r| {
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(r.clone())),
                        if_match: etag.clone(),
                        ..Default::default()
                    };
                    let path = &path;
                    async move {
                        let got = self.store.get_opts(path, opts).await?;
                        Ok::<_, object_store::Error>((r.start, got.bytes().await?))
                    }
                })
                .buffer_unordered(RANGES_IN_FLIGHT)
                .map_err(|e| self.err("downloading", name, &e))
                .try_for_each(|(at, data)| async move {
                    if data.len() as u64 != (RANGE_BYTES).min(size - at) {
                        return Err(BucketError {
                            doing: "downloading".into(),
                            target: format!("{}/{name}", self.url.trim_end_matches('/')),
                            message: format!(
                                "a range at {at} came back short ({} bytes)",
                                data.len()
                            ),
                            transient: true,
                        });
                    }
                    write_at(data, at).await.map_err(io)
                })
                .await?;
            file.sync_all().map_err(io)
        }
        .await;
        drop(file);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        crate::durable::commit_rename(&tmp, dest).map_err(io)?;
        Ok(size)
    }

    /// One listing request: the bucket exists and these credentials may list
    /// it (some servers create a missing bucket on the first PUT instead of
    /// refusing it).
    pub async fn probe(&self) -> Result<(), BucketError> {
        use futures_util::StreamExt;
        match self.store.list(Some(&self.prefix)).next().await {
            Some(Err(e)) => Err(self.err("listing", "", &e)),
            _ => Ok(()),
        }
    }

    /// `check` on a sender: one listing, and one small object written
    /// (`.ferry-check-<sender>`, overwritten by each check, never a bundle
    /// name, so receivers pass it by; a sender without delete rights cannot
    /// remove it). Returns the object's name.
    pub async fn check_writable(&self, sender: &str) -> Result<String, BucketError> {
        self.probe().await?;
        let name = format!(".ferry-check-{sender}");
        let body = format!(
            "written by `ferry-sender check` at {}\n",
            chrono::Utc::now()
        );
        self.store
            .put(&self.path(&name), PutPayload::from(body.into_bytes()))
            .await
            .map_err(|e| self.err("writing", &name, &e))?;
        Ok(name)
    }

    /// Removes `name` (sender-side retention only).
    pub async fn delete(&self, name: &str) -> Result<(), BucketError> {
        self.store
            .delete(&self.path(name))
            .await
            .map_err(|e| self.err("deleting", name, &e))
    }
}

/// An object store error as an operator reads it, and whether it may pass.
fn explain(text: &str) -> (String, bool) {
    let lower = text.to_lowercase();
    // A status 403, not the digits inside a duration ("in 298.403906ms").
    let status_403 = lower.match_indices("403").any(|(i, _)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + 3..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit())
    });
    if lower.contains("invalidaccesskeyid")
        || lower.contains("signaturedoesnotmatch")
        || status_403
        || lower.contains("forbidden")
        || lower.contains("access denied")
        || lower.contains("accessdenied")
    {
        (
            format!(
                "the server refused the credentials ({text}); check AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (or `bucket.credentials_file` and `bucket.profile`) and \
                 the key's policy (docs/object-store.md)"
            ),
            false,
        )
    } else if lower.contains("nosuchbucket") {
        (
            format!("the bucket does not exist ({text}); create it, or fix `bucket.url`"),
            false,
        )
    } else if lower.contains("connect")
        || lower.contains("timed out")
        || lower.contains("connection")
        || lower.contains("error sending request")
    {
        (
            format!(
                "the object store is unreachable ({text}); check `bucket.endpoint` and that the server is running"
            ),
            true,
        )
    } else {
        (text.to_owned(), true)
    }
}

/// `aws_access_key_id` and `aws_secret_access_key` of `[profile]` in an AWS
/// shared credentials file.
fn read_credentials(file: &Path, profile: &str) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("bucket.credentials_file {}: {e}", file.display()))?;
    let mut section = String::new();
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().trim_start_matches("profile ").to_owned();
        } else if section == profile
            && let Some((k, v)) = line.split_once('=')
        {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => Err(format!(
            "bucket.credentials_file {} has no [{profile}] with aws_access_key_id and \
             aws_secret_access_key",
            file.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::explain;

    #[test]
    fn errors_are_classified_by_status_not_by_digits() {
        let (m, transient) =
            explain("Error performing GET in 298.403906ms - HTTP error: error sending request");
        assert!(transient && m.contains("unreachable"), "{m}");
        let (m, transient) =
            explain("Client error with status 403 Forbidden: SignatureDoesNotMatch");
        assert!(!transient && m.contains("refused the credentials"), "{m}");
        let (m, transient) = explain("Client error with status 404 Not Found: NoSuchBucket");
        assert!(!transient && m.contains("does not exist"), "{m}");
    }
}
