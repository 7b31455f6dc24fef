//! S3 access: client configuration, ListObjectsV2 with pagination, and the
//! streaming ranged GET the blob store downloads through.
//!
//! rust-s3 supplies the region, the credentials and SigV4 (every request is
//! a presigned URL, so headers such as `Range` and `If-Match` stay outside
//! the signature and the body is never buffered); ureq does the HTTP, with
//! no content decoding so ranges and digests see the raw bytes. Every
//! request has an overall deadline (`--timeout`; an object body gets that
//! plus its size at [`MIN_BODY_RATE`]), so a server that accepts and never
//! answers, or trickles, cannot hold the caller (and its state lock).
//! Requests are retried here (`--retries`) with bounded exponential backoff
//! and jitter; HTTP errors become [`Kind`]s (403 → NoPerm, 404 →
//! NoSuchImage, the rest Unavailable) with messages that name the endpoint,
//! the bucket and the key. Text a server sends is escaped ([`printable`])
//! before it reaches a message. A listing is bounded ([`MAX_LIST_PAGES`],
//! [`MAX_LIST_KEYS`], [`MAX_XML_BODY`]) and a repeated continuation token
//! is an error. This module never touches the database or the local
//! filesystem, and never interprets what an object contains.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use s3::creds::Credentials;
use s3::{Bucket, Region};

use crate::error::{Error, Kind, Result};
use crate::ops::retry::RetryPolicy;

/// How a client reaches its bucket. The command layer builds it from the
/// invocation (`cli::settings::s3_config`); this module never reads flags.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the image folders, e.g. `images/` (may be empty).
    pub prefix: String,
    pub region: String,
    /// S3-compatible endpoints, tried in order (empty: AWS for the region);
    /// any implies path-style addressing.
    pub endpoints: Vec<String>,
    /// Never sign requests.
    pub anonymous: bool,
    /// Overall deadline of one request: connecting, the reply's head and a
    /// listing or error body. An object body gets this plus its size at
    /// [`MIN_BODY_RATE`].
    pub timeout: Duration,
    /// How often a request that failed in a way that may pass is tried again.
    pub retries: u32,
}

/// The slowest object transfer waited for, in bytes per second: a GET's
/// deadline is the timeout plus the bytes asked for at this rate, and a
/// whole download's is the timeout per attempt plus its size at this rate.
pub const MIN_BODY_RATE: u64 = 64 << 10;
/// At most this many ListObjectsV2 pages per listing.
pub const MAX_LIST_PAGES: u64 = 2_000;
/// At most this many objects per listing (250 full pages).
pub const MAX_LIST_KEYS: usize = 250_000;
/// The largest listing page or error document read (a 1000-key page is a
/// few hundred KiB). A larger one is refused, not retried.
pub const MAX_XML_BODY: u64 = 8 << 20;
/// The longest continuation token accepted.
const MAX_TOKEN: usize = 4096;

/// Server-supplied text made safe to print, log or store: control
/// characters (terminal escapes, newlines) escaped, cut to `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One object from a listing. `etag` is without its quotes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub last_modified: String,
}

/// Whether an ETag is a plain MD5 of the content (32 hex digits, no `-N`
/// multipart suffix): only such an ETag says anything about the bytes.
pub fn etag_is_plain_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A failed request, before it becomes an [`Error`]: whether trying again may help.
struct Failure {
    err: Error,
    retryable: bool,
}

impl Failure {
    /// Whether the next endpoint may answer instead: this one is
    /// unreachable, timed out or failing (5xx, throttling). An answer about
    /// the request itself (auth, 404, a bad reply) never falls through: a
    /// cache must not hide a missing object or a bad credential.
    fn falls_through(&self) -> bool {
        self.retryable
    }
}

/// One endpoint the bucket is reached through.
struct Target {
    bucket: Box<Bucket>,
    /// The endpoint URL, for messages (no credentials in it).
    url: String,
}

/// The body of a successful GET: a reader over the raw bytes from `offset`.
pub struct ObjectStream {
    reader: Box<dyn Read + Send>,
    /// The ETag the server served (quotes removed).
    pub etag: String,
    /// Size of the whole object.
    pub total_size: u64,
    /// First byte of this body within the object.
    pub offset: u64,
    /// `x-amz-checksum-sha256` of the whole object (base64), when the
    /// server sent one with a whole-object (200) reply.
    pub checksum_sha256: Option<String>,
}

impl Read for ObjectStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

/// What a conditional GET found.
pub enum Got {
    Body(ObjectStream),
    /// `If-Match` failed: the object is no longer the one asked for (412).
    Changed,
}

/// A client for one bucket. `Sync`: download threads share one.
pub struct S3Client {
    /// The endpoints in the configured order.
    targets: Vec<Target>,
    /// The target that answered last: requests start there.
    active: AtomicUsize,
    /// A fallback to another endpoint was logged (once per client).
    fell_back: AtomicBool,
    config: S3Config,
    anonymous: bool,
    agent: ureq::Agent,
    retry: RetryPolicy,
    /// The configured endpoints, joined: where objects come from, as the
    /// scope of deduplication (and in messages about the whole set).
    endpoint: String,
}

/// Where the credentials came from, for the log.
fn load_credentials(cfg: &S3Config) -> Result<Option<Credentials>> {
    if cfg.anonymous {
        return Ok(None);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(a), Some(s)) => {
            let token = env("AWS_SESSION_TOKEN");
            let c = Credentials::new(Some(&a), Some(&s), None, token.as_deref(), None)
                .map_err(|e| Error::new(Kind::NoPerm, "reading credentials from the environment").with_source(e))?;
            log::debug!("using credentials from AWS_ACCESS_KEY_ID");
            return Ok(Some(c));
        }
        (Some(_), None) | (None, Some(_)) => return Err(Error::new(
            Kind::NoPerm,
            "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; set both, or neither (with --anonymous)",
        )),
        (None, None) => {}
    }
    let explicit = env("AWS_PROFILE");
    let profile = explicit.clone().unwrap_or_else(|| "default".to_string());
    match Credentials::from_profile(Some(&profile)) {
        Ok(c) if c.access_key.is_some() => {
            log::debug!("using credentials of profile {profile:?}");
            Ok(Some(c))
        }
        Ok(_) | Err(_) if explicit.is_some() => Err(Error::new(
            Kind::NoPerm,
            format!(
                "AWS_PROFILE={profile}: no such profile with aws_access_key_id and aws_secret_access_key in {}",
                env("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|| "~/.aws/credentials".to_string())
            ),
        )),
        _ => {
            log::info!("no AWS credentials found; sending anonymous requests to bucket {}", cfg.bucket);
            Ok(None)
        }
    }
}

impl S3Client {
    pub fn new(config: S3Config) -> Result<S3Client> {
        let creds = load_credentials(&config)?;
        let anonymous = creds.is_none();
        let creds = match creds {
            Some(c) => c,
            None => Credentials::anonymous().map_err(|e| Error::software("anonymous credentials").with_source(e))?,
        };
        let mut targets = Vec::new();
        for ep in &config.endpoints {
            let ep = ep.trim().trim_end_matches('/');
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(Error::usage(format!("--endpoint {ep:?}: must start with http:// or https://")));
            }
            let region = Region::Custom { region: config.region.clone(), endpoint: ep.to_string() };
            // Custom endpoints (SeaweedFS, MinIO, ...) need path-style.
            let bucket = Bucket::new(&config.bucket, region, creds.clone())
                .map_err(|e| Error::usage(format!("bucket {:?}", config.bucket)).with_source(e))?
                .with_path_style();
            targets.push(Target { bucket, url: without_userinfo(ep) });
        }
        if targets.is_empty() {
            let region = config
                .region
                .parse::<Region>()
                .map_err(|e| Error::usage(format!("--region {:?}", config.region)).with_source(e))?;
            let mut bucket = Bucket::new(&config.bucket, region, creds)
                .map_err(|e| Error::usage(format!("bucket {:?}", config.bucket)).with_source(e))?;
            // Dotted bucket names need path-style; AWS accepts both.
            if config.bucket.contains('.') {
                bucket = bucket.with_path_style();
            }
            let url = without_userinfo(bucket.url().trim_end_matches('/'));
            targets.push(Target { bucket, url });
        }
        let t = config.timeout.max(Duration::from_millis(100));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(t))
            .timeout_connect(Some(t))
            .timeout_recv_response(Some(t))
            // Stall timeout: a body that sends nothing for this long is a
            // dropped connection, retried from where it stopped.
            .timeout_per_read(Some(t))
            .user_agent(concat!("thinimg/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let endpoint = targets.iter().map(|t| t.url.as_str()).collect::<Vec<_>>().join(",");
        let retry = RetryPolicy::request().with_attempts(config.retries.saturating_add(1));
        Ok(S3Client {
            targets,
            active: AtomicUsize::new(0),
            fell_back: AtomicBool::new(false),
            config,
            anonymous,
            agent,
            retry,
            endpoint,
        })
    }

    /// The configured endpoint URLs, comma-joined: the scope within which
    /// content is deduplicated.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint requests go to now (the one that answered last).
    pub fn active_endpoint(&self) -> &str {
        &self.targets[self.active.load(Ordering::Relaxed) % self.targets.len()].url
    }

    /// How long a whole download of `bytes` may take, retries included,
    /// before it is abandoned (its durable part is kept for the next run).
    pub fn transfer_budget(&self, bytes: u64) -> Duration {
        let backoff: Duration = (1..self.retry.attempts.max(1)).map(|a| self.retry.max_sleep(a)).sum();
        self.config.timeout.saturating_mul(self.retry.attempts.max(1))
            + Duration::from_secs(bytes / MIN_BODY_RATE)
            + backoff
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }
    pub fn with_retry(mut self, retry: RetryPolicy) -> S3Client {
        self.retry = retry;
        self
    }
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// `s3://bucket/key`, for messages.
    pub fn url_of(&self, key: &str) -> String {
        format!("s3://{}/{}", self.config.bucket, key)
    }

    /// The URL for `key` (`""`: the bucket itself) with `query`, presigned
    /// unless anonymous.
    fn url(&self, t: &Target, key: &str, query: &[(&str, String)]) -> Result<String> {
        if self.anonymous {
            let mut u = format!("{}/{}", t.bucket.url(), s3::signing::uri_encode(key, false));
            for (i, (k, v)) in query.iter().enumerate() {
                u.push(if i == 0 { '?' } else { '&' });
                u.push_str(&s3::signing::uri_encode(k, true));
                u.push('=');
                u.push_str(&s3::signing::uri_encode(v, true));
            }
            return Ok(u);
        }
        let q: std::collections::HashMap<String, String> =
            query.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let path = format!("/{key}");
        t.bucket
            .presign_get(&path, 3600, if q.is_empty() { None } else { Some(q) })
            .map_err(|e| Error::new(Kind::NoPerm, format!("signing a request for {}", self.url_of(key))).with_source(e))
    }

    /// Every object under `prefix`, following ListObjectsV2 continuation
    /// tokens. `THINIMG_S3_MAX_KEYS` (tests) sets the page size.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let max_keys = std::env::var("THINIMG_S3_MAX_KEYS").ok().and_then(|v| v.parse::<u32>().ok());
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut seen: HashSet<String> = HashSet::new();
        let mut pages = 0u64;
        loop {
            let mut q = vec![("list-type", "2".to_string()), ("prefix", prefix.to_string())];
            if let Some(m) = max_keys {
                q.push(("max-keys", m.to_string()));
            }
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            let listing = format!("listing s3://{}/{prefix}", self.config.bucket);
            let body = self.with_retries(&listing, |t| {
                let what = format!("{listing} at {}", t.url);
                let url = self.url(t, "", &q).map_err(|err| Failure { err, retryable: false })?;
                let mut resp = self.agent.get(&url).call().map_err(|e| self.transport_failure(t, &what, e))?;
                let status = resp.status().as_u16();
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_XML_BODY)
                    .read_to_string()
                    .map_err(|e| self.transport_failure(t, &what, e))?;
                if status != 200 {
                    return Err(self.status_failure(t, &what, status, &body, None));
                }
                Ok(body)
            })?;
            let what = format!("{listing} at {}", self.active_endpoint());
            let page = parse_list_page(&body).map_err(|m| {
                Error::new(
                    Kind::Unavailable,
                    format!(
                        "{what}: not a ListObjectsV2 reply ({}); is {} an S3 endpoint?",
                        printable(&m, 200),
                        self.active_endpoint()
                    ),
                )
            })?;
            pages += 1;
            out.extend(page.objects);
            if out.len() > MAX_LIST_KEYS {
                return Err(Error::new(
                    Kind::Unavailable,
                    format!("{what}: more than {MAX_LIST_KEYS} objects (limit); use a narrower --prefix"),
                ));
            }
            match (page.truncated, page.next_token) {
                (true, Some(t)) => {
                    if t.len() > MAX_TOKEN {
                        return Err(Error::new(
                            Kind::Unavailable,
                            format!(
                                "{what}: page {pages} has a continuation token of {} bytes (limit {MAX_TOKEN})",
                                t.len()
                            ),
                        ));
                    }
                    if !seen.insert(t.clone()) {
                        return Err(Error::new(
                            Kind::Unavailable,
                            format!(
                                "{what}: page {pages} repeats the continuation token {:?} of an earlier page; the listing would loop",
                                printable(&t, 100)
                            ),
                        ));
                    }
                    if pages >= MAX_LIST_PAGES {
                        return Err(Error::new(
                            Kind::Unavailable,
                            format!("{what}: more than {MAX_LIST_PAGES} pages (limit)"),
                        ));
                    }
                    token = Some(t);
                }
                (true, None) => {
                    return Err(Error::new(
                        Kind::Unavailable,
                        format!("{what}: truncated page {pages} without a continuation token"),
                    ))
                }
                (false, _) => break,
            }
        }
        log::debug!("listed {} objects under s3://{}/{prefix} in {pages} pages", out.len(), self.config.bucket);
        Ok(out)
    }

    /// GET `key` from byte `offset`, conditional on `if_match` when given.
    /// `expect` is how many bytes the caller expects from `offset`: the
    /// request's deadline is the timeout plus those bytes at
    /// [`MIN_BODY_RATE`]. Retries connection failures and 5xx/429;
    /// `Got::Changed` on 412.
    pub fn get(&self, key: &str, offset: u64, if_match: Option<&str>, expect: u64) -> Result<Got> {
        let downloading = format!("downloading {}", self.url_of(key));
        let deadline = self.config.timeout + Duration::from_secs(expect / MIN_BODY_RATE);
        self.with_retries(&downloading, |t| {
            let what = format!("{downloading} from {}", t.url);
            let url = self.url(t, key, &[]).map_err(|err| Failure { err, retryable: false })?;
            let mut req = self.agent.get(&url).config().timeout_global(Some(deadline)).build();
            if offset > 0 {
                req = req.header("Range", &format!("bytes={offset}-"));
            }
            if let Some(e) = if_match {
                req = req.header("If-Match", &format!("\"{e}\""));
            }
            let resp = req.call().map_err(|e| self.transport_failure(t, &what, e))?;
            let status = resp.status().as_u16();
            let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let etag = header("etag").unwrap_or_default().trim_matches('"').to_string();
            let checksum_sha256 = header("x-amz-checksum-sha256");
            match status {
                412 => return Ok(Got::Changed),
                200 | 206 => {}
                _ => {
                    let mut body = String::new();
                    let _ = resp.into_body().into_reader().take(64 << 10).read_to_string(&mut body);
                    return Err(self.status_failure(t, &what, status, &body, Some(key)));
                }
            }
            let len: Option<u64> = header("content-length").and_then(|v| v.trim().parse().ok());
            let (start, total) = if status == 206 {
                let cr = header("content-range").unwrap_or_default();
                parse_content_range(&cr).ok_or_else(|| Failure {
                    err: Error::new(
                        Kind::Unavailable,
                        format!("{what}: bad Content-Range \"{}\" in a 206 reply", printable(&cr, 100)),
                    ),
                    retryable: true,
                })?
            } else {
                let total = len.ok_or_else(|| Failure {
                    err: Error::new(Kind::Unavailable, format!("{what}: reply has no Content-Length")),
                    retryable: true,
                })?;
                (0, total)
            };
            if start != offset {
                return Err(Failure {
                    err: Error::new(
                        Kind::Unavailable,
                        format!("{what}: asked for bytes from {offset}, server sent from {start}"),
                    ),
                    retryable: true,
                });
            }
            let reader = resp.into_body().into_reader();
            Ok(Got::Body(ObjectStream {
                reader: Box::new(reader),
                etag,
                total_size: total,
                offset: start,
                checksum_sha256: checksum_sha256.filter(|_| status == 200),
            }))
        })
    }

    /// Size and ETag of one object, without a listing. Presigned URLs
    /// are method-specific and rust-s3 presigns only GET, so this is a GET
    /// of the first byte (`Range: bytes=0-0`), which S3 answers with the
    /// whole object's size in Content-Range, like a HEAD would.
    pub fn stat(&self, key: &str) -> Result<ObjectInfo> {
        let checking = format!("checking {}", self.url_of(key));
        self.with_retries(&checking, |t| {
            let what = format!("{checking} at {}", t.url);
            let url = self.url(t, key, &[]).map_err(|err| Failure { err, retryable: false })?;
            let mut resp = self
                .agent
                .get(&url)
                .header("Range", "bytes=0-0")
                .call()
                .map_err(|e| self.transport_failure(t, &what, e))?;
            let status = resp.status().as_u16();
            let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let etag = header("etag").unwrap_or_default().trim_matches('"').to_string();
            let last_modified = header("last-modified").unwrap_or_default();
            let size = match status {
                206 => header("content-range").as_deref().and_then(parse_content_range).map(|(_, t)| t),
                200 => header("content-length").and_then(|v| v.trim().parse().ok()),
                // Not satisfiable: only an empty object has no byte 0.
                416 => Some(0),
                _ => {
                    let body = resp.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
                    return Err(self.status_failure(t, &what, status, &body, Some(key)));
                }
            };
            let size = size.ok_or_else(|| Failure {
                err: Error::new(Kind::Unavailable, format!("{what}: reply without a usable size")),
                retryable: true,
            })?;
            Ok(ObjectInfo { key: key.to_string(), etag, size, last_modified })
        })
    }

    /// Run one request with retries. Each attempt starts at the endpoint
    /// that answered last and falls through to the next one while the
    /// failure says the endpoint is unreachable or failing (logged once per
    /// client); an answer about the request itself is final.
    fn with_retries<T>(&self, what: &str, mut f: impl FnMut(&Target) -> std::result::Result<T, Failure>) -> Result<T> {
        let n = self.targets.len();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let start = self.active.load(Ordering::Relaxed) % n;
            let mut k = 0;
            let failure = loop {
                let i = (start + k) % n;
                match f(&self.targets[i]) {
                    Ok(v) => {
                        self.active.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(fl) if fl.falls_through() && k + 1 < n => {
                        let next = &self.targets[(i + 1) % n].url;
                        if !self.fell_back.swap(true, Ordering::Relaxed) {
                            log::warn!("{}; falling back to {next}", fl.err.full_message());
                        } else {
                            log::debug!("{}; falling back to {next}", fl.err.full_message());
                        }
                        k += 1;
                    }
                    Err(fl) => break fl,
                }
            };
            match failure {
                Failure { err, retryable: true } if attempt < self.retry.attempts => {
                    log::warn!("{} (attempt {attempt} of {}; retrying)", err.full_message(), self.retry.attempts);
                    self.retry.sleep_jittered(attempt)?;
                }
                Failure { err, retryable } => {
                    return Err(if retryable {
                        err.context(format!("{what}: giving up after {attempt} attempts"))
                    } else {
                        err
                    })
                }
            }
        }
    }
}

impl S3Client {
    /// Classify a failure before (or while) reading a reply: a TLS or HTTP
    /// mismatch is named and not retried; an oversized body is refused, not
    /// retried; the rest (refused, reset, timed out) may pass.
    fn transport_failure(&self, t: &Target, what: &str, e: ureq::Error) -> Failure {
        classify_transport(what, &t.url, t.url.starts_with("https://"), self.config.timeout, e)
    }

    fn status_failure(&self, t: &Target, what: &str, status: u16, body: &str, key: Option<&str>) -> Failure {
        let f = status_failure(what, status, body, &self.config.bucket, key, &t.url);
        if status == 403 && self.anonymous && f.err.message().contains("access denied") {
            // Unsigned requests: the advice about --anonymous does not apply.
            let obj = key.map(|k| self.url_of(k)).unwrap_or_else(|| format!("bucket {}", self.config.bucket));
            return Failure {
                err: Error::new(
                    Kind::NoPerm,
                    format!(
                        "{what}: access denied to {obj} for unsigned (anonymous) requests; the bucket is not public: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and drop --anonymous"
                    ),
                ),
                retryable: false,
            };
        }
        f
    }
}

fn classify_transport(what: &str, endpoint: &str, https: bool, timeout: Duration, e: ureq::Error) -> Failure {
    let permanent = |msg: String, e: ureq::Error| Failure {
        err: Error::new(Kind::Unavailable, format!("{what}: {msg}")).with_source(e),
        retryable: false,
    };
    match e {
        ureq::Error::BodyExceedsLimit(n) => permanent(
            format!("the reply is larger than {n} bytes (limit); refusing it"),
            ureq::Error::BodyExceedsLimit(n),
        ),
        // rustls reports a bad handshake as an InvalidData I/O error.
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) if https => permanent(
            format!(
                "TLS handshake with {endpoint} failed; if the endpoint speaks plain HTTP, use {}",
                endpoint.replacen("https://", "http://", 1)
            ),
            e,
        ),
        ureq::Error::Io(ref io) if https && io.kind() == std::io::ErrorKind::InvalidData => permanent(
            format!(
                "TLS handshake with {endpoint} failed; if the endpoint speaks plain HTTP, use {}",
                endpoint.replacen("https://", "http://", 1)
            ),
            e,
        ),
        ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) if !https => permanent(
            format!(
                "{endpoint} did not answer with HTTP; if it speaks TLS, use {}",
                endpoint.replacen("http://", "https://", 1)
            ),
            e,
        ),
        ureq::Error::Timeout(t) => Failure {
            err: Error::new(
                Kind::Unavailable,
                format!("{what}: no complete answer within the deadline ({} s, --timeout; {t})", timeout.as_secs_f64()),
            ),
            retryable: true,
        },
        e => Failure { err: Error::new(Kind::Unavailable, what.to_string()).with_source(e), retryable: true },
    }
}

/// `http://user:secret@host` → `http://host`: messages never carry credentials.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit_once('@').map(|(_, h)| h).unwrap_or(auth);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Classify an HTTP error reply by status and S3 error code.
fn status_failure(what: &str, status: u16, body: &str, bucket: &str, key: Option<&str>, endpoint: &str) -> Failure {
    let code = printable(&xml_text(body, "Code").unwrap_or_default(), 64);
    let s3msg = printable(&xml_text(body, "Message").unwrap_or_default(), 300);
    let s3_error = body.contains("<Error>") || body.contains("<Error ") || !code.is_empty();
    let obj = match key {
        Some(k) => format!("s3://{bucket}/{k}"),
        None => format!("bucket {bucket}"),
    };
    let detail = if code.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status} {code}") };
    let (kind, retryable, why) = match (status, code.as_str()) {
        (403, "SignatureDoesNotMatch") => {
            (Kind::NoPerm, false, "the secret key is wrong (signature does not match)".to_string())
        }
        (403, "InvalidAccessKeyId") => (Kind::NoPerm, false, "the access key id is not known to the server".into()),
        (403, "RequestTimeTooSkewed") => {
            (Kind::NoPerm, false, "this host's clock differs too much from the server's; fix the clock".into())
        }
        (403, "ExpiredToken") | (400, "ExpiredToken") => (Kind::NoPerm, false, "the session token has expired".into()),
        (403, _) => (
            Kind::NoPerm,
            false,
            format!("access denied to {obj} (check the credentials, or --anonymous for a public bucket)"),
        ),
        (401, _) => (Kind::NoPerm, false, "authentication required".into()),
        // An S3 server answers an error with an <Error> document; a web
        // server, a filer or a proxy on the wrong port does not.
        (400 | 404 | 405 | 501, _) if !s3_error => (
            Kind::Unavailable,
            false,
            format!("{endpoint} answered HTTP {status} without an S3 error document; it does not look like an S3 endpoint (wrong port or URL?)"),
        ),
        (404, "NoSuchBucket") => (Kind::NoSuchImage, false, format!("bucket {bucket} does not exist")),
        (404, _) => (Kind::NoSuchImage, false, format!("{obj} does not exist")),
        (301 | 307 | 308, _) => (
            Kind::Unavailable,
            false,
            format!(
                "bucket {bucket} is in another region or needs another endpoint (redirect); set --region or --endpoint"
            ),
        ),
        (429, _) | (503, _) => (Kind::Unavailable, true, "server is throttling (SlowDown)".into()),
        (500..=599, _) => (Kind::Unavailable, true, "server error".into()),
        (400, "RequestTimeout") => (Kind::Unavailable, true, "server timed out the request".into()),
        _ => (Kind::Unavailable, false, "unexpected reply".into()),
    };
    let mut msg = format!("{what}: {why} ({detail}");
    if !s3msg.is_empty() {
        msg.push_str(": ");
        msg.push_str(&s3msg);
    }
    msg.push(')');
    Failure { err: Error::new(kind, msg), retryable }
}

/// `bytes START-END/TOTAL` → (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.parse::<u64>().ok()?, end.parse::<u64>().ok()?, total.parse::<u64>().ok()?);
    (start <= end && end < total).then_some((start, total))
}

/// One page of a ListObjectsV2 reply.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub truncated: bool,
    pub next_token: Option<String>,
}

/// Parse a ListObjectsV2 reply. The format is flat and fixed, so this reads
/// only the elements it needs: `<Contents>` blocks (Key, ETag, Size,
/// LastModified), `IsTruncated` and `NextContinuationToken`. Text is
/// entity-decoded; keys cannot contain `<`, so element boundaries are exact.
pub fn parse_list_page(xml: &str) -> std::result::Result<ListPage, String> {
    if !xml.contains("<ListBucketResult") {
        return Err("no <ListBucketResult> element".into());
    }
    let mut page = ListPage::default();
    let mut rest = xml;
    while let Some(i) = rest.find("<Contents>") {
        let after = &rest[i + "<Contents>".len()..];
        let end = after.find("</Contents>").ok_or("unterminated <Contents>")?;
        let block = &after[..end];
        let key = xml_text(block, "Key").ok_or("<Contents> without <Key>")?;
        let size_s = xml_text(block, "Size").ok_or_else(|| format!("object {key:?} has no <Size>"))?;
        let size = size_s.trim().parse::<u64>().map_err(|_| format!("object {key:?}: bad <Size> {size_s:?}"))?;
        let etag = xml_text(block, "ETag").unwrap_or_default().trim_matches('"').to_string();
        let last_modified = xml_text(block, "LastModified").unwrap_or_default();
        page.objects.push(ObjectInfo { key, etag, size, last_modified });
        rest = &after[end + "</Contents>".len()..];
    }
    // The top-level elements follow or precede the Contents blocks; search
    // outside them so an object key cannot fake them.
    let outside = strip_blocks(xml, "Contents");
    page.truncated = xml_text(&outside, "IsTruncated").map(|v| v.trim() == "true").unwrap_or(false);
    page.next_token = xml_text(&outside, "NextContinuationToken").filter(|t| !t.is_empty());
    Ok(page)
}

fn strip_blocks(xml: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = String::with_capacity(xml.len().min(4096));
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        out.push_str(&rest[..i]);
        match rest[i..].find(&close) {
            Some(j) => rest = &rest[i + j + close.len()..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// The decoded text of the first `<tag>...</tag>` in `xml`.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let i = xml.find(&open)? + open.len();
    let j = xml[i..].find(&close)? + i;
    Some(xml_unescape(&xml[i..j]))
}

fn xml_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';').filter(|&n| n <= 12) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let ent = &tail[1..semi];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => {
                let n = if let Some(h) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse::<u32>().ok()
                } else {
                    None
                };
                n.and_then(char::from_u32)
            }
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_seaweedfs_page_with_entities() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>pub</Name><Prefix></Prefix><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated><Contents><Key>images/golang/1.tar</Key><ETag>&#34;1ebb3771887c29122ac4391184c52b01&#34;</ETag><Size>5000</Size><LastModified>2026-11-22T01:01:35Z</LastModified></Contents><Contents><Key>images/a &amp; b/&lt;IsTruncated&gt;false&lt;/IsTruncated&gt;</Key><ETag>"x-2"</ETag><Size>3</Size></Contents><NextContinuationToken>abc+/=</NextContinuationToken></ListBucketResult>"#;
        let p = parse_list_page(xml).unwrap();
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.objects[0].etag, "1ebb3771887c29122ac4391184c52b01");
        assert_eq!(p.objects[0].size, 5000);
        assert_eq!(p.objects[1].key, "images/a & b/<IsTruncated>false</IsTruncated>");
        assert!(p.truncated);
        assert_eq!(p.next_token.as_deref(), Some("abc+/="));
        assert!(parse_list_page("<Error/>").is_err());
        let bad = "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>";
        assert!(parse_list_page(bad).is_err());
    }

    #[test]
    fn content_range_and_etags() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 200)));
        assert_eq!(parse_content_range("bytes 100-200/200"), None);
        assert_eq!(parse_content_range("bytes */200"), None);
        assert!(etag_is_plain_md5("1ebb3771887c29122ac4391184c52b01"));
        assert!(!etag_is_plain_md5("1ebb3771887c29122ac4391184c52b01-3"));
        assert_eq!(xml_unescape("a&#x41;&#66;&bogus;&"), "aAB&bogus;&");
    }

    #[test]
    fn error_codes_map_to_kinds() {
        let body = "<Error><Code>SignatureDoesNotMatch</Code><Message>m</Message></Error>";
        let f = status_failure("listing", 403, body, "b", None, "http://e");
        assert_eq!(f.err.kind(), Kind::NoPerm);
        assert!(f.err.message().contains("secret key is wrong"), "{}", f.err.message());
        let f = status_failure(
            "get",
            404,
            "<Error><Code>NoSuchKey</Code></Error>",
            "b",
            Some("images/x/1.tar"),
            "http://e",
        );
        assert_eq!(f.err.kind(), Kind::NoSuchImage);
        assert!(f.err.message().contains("s3://b/images/x/1.tar"));
        let skew = "<Error><Code>RequestTimeTooSkewed</Code></Error>";
        let f = status_failure("listing", 403, skew, "b", None, "http://e");
        assert_eq!(f.err.kind(), Kind::NoPerm);
        assert!(f.err.message().contains("clock"), "{}", f.err.message());
        assert!(!f.retryable);
        assert!(status_failure("g", 503, "", "b", None, "http://e").retryable);
        assert!(!status_failure("g", 400, "", "b", None, "http://e").retryable);
        // Not an S3 error document: named as a wrong endpoint, not a missing bucket.
        let f = status_failure("listing", 404, "<html>404 page not found</html>", "b", None, "http://e:8888");
        assert_eq!(f.err.kind(), Kind::Unavailable);
        assert!(f.err.message().contains("does not look like an S3 endpoint"), "{}", f.err.message());
        assert!(f.err.message().contains("http://e:8888"), "{}", f.err.message());
        // Server text is escaped before it can reach a terminal or a log.
        let evil = "<Error><Code>InternalError</Code><Message>\u{1b}[31mred\u{1b}[0m\nthinimg: error: injected</Message></Error>";
        let f = status_failure("g", 500, evil, "b", None, "http://e");
        let m = f.err.message();
        assert!(!m.chars().any(|c| c.is_control()), "{m:?}");
        assert!(m.contains("\\u{1b}[31mred") && m.contains("\\nthinimg"), "{m:?}");
        assert_eq!(printable(&"x".repeat(500), 10), format!("{}...", "x".repeat(10)));
        assert_eq!(without_userinfo("http://u:p@h:1/x"), "http://h:1/x");
    }
}
