//! Fleet scale: many hosts fetch through a regional S3-compatible
//! read-through cache instead of the origin bucket.
//!
//! Topology, all real and on loopback: an origin SeaweedFS holding the
//! bucket with signed access; a counting proxy in front of the origin that
//! parses each request line (so the origin's reads are counted per object);
//! a cache SeaweedFS that remote-mounts the origin bucket through that proxy
//! (`remote.configure` + `remote.mount`, the README's "Fleet scale"
//! configuration); and 16 simulated hosts, each a `thinimg fetch` with its
//! own state dir, started at the same moment against the cache.
//!
//! What must hold: every host ends with every blob, byte-identical to the
//! origin's objects; the origin serves each object's bytes at most once
//! whatever the number of hosts; and the cache's listing, whose ETags are
//! empty for objects it has not read yet, never makes a host trust or
//! deduplicate content it did not verify.

mod common;

use common::{sha256_hex, tar_layer, S3Server, Thinimg, ACCESS_KEY, SECRET_KEY};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const HOSTS: usize = 16;

/// One read of an object at the origin: the byte range asked for (None =
/// the whole object).
#[derive(Debug, Clone)]
struct OriginRead {
    range: Option<(u64, Option<u64>)>,
}

/// A TCP proxy in front of the origin that parses the client side of each
/// HTTP/1.1 connection (request line, headers, Content-Length bodies) and
/// records every GET of an object (listings, with a query string, are not
/// object reads). Responses are forwarded as they are.
struct CountingProxy {
    endpoint: String,
    reads: Arc<Mutex<BTreeMap<String, Vec<OriginRead>>>>,
}

impl CountingProxy {
    fn start(upstream: &str) -> CountingProxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        let reads: Arc<Mutex<BTreeMap<String, Vec<OriginRead>>>> = Arc::default();
        let r2 = reads.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                let (up, reads) = (up.clone(), r2.clone());
                std::thread::spawn(move || proxy_conn(client, &up, &reads));
            }
        });
        CountingProxy { endpoint, reads }
    }

    fn reads(&self) -> BTreeMap<String, Vec<OriginRead>> {
        self.reads.lock().unwrap().clone()
    }
}

fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let r = v.trim().strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    Some((a.parse().ok()?, if b.is_empty() { None } else { b.parse().ok() }))
}

fn proxy_conn(mut client: TcpStream, up: &str, reads: &Mutex<BTreeMap<String, Vec<OriginRead>>>) {
    let Ok(mut server) = TcpStream::connect(up) else { return };
    let (Ok(mut s2), Ok(mut c2)) = (server.try_clone(), client.try_clone()) else { return };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Both);
    });
    let mut buf: Vec<u8> = Vec::new();
    let mut b = vec![0u8; 64 << 10];
    loop {
        // One request head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match client.read(&mut b) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
        let (mut len, mut range) = (0u64, None);
        for h in lines {
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "range" => range = parse_range(v),
                    _ => {}
                }
            }
        }
        if method == "GET" && !target.contains('?') {
            reads.lock().unwrap().entry(target.to_string()).or_default().push(OriginRead { range });
        }
        // Forward the head and the body (Content-Length; the cache only reads).
        let want = end as u64 + len;
        while (buf.len() as u64) < want {
            match client.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
        let rest = buf.split_off(want as usize);
        if server.write_all(&buf).is_err() {
            return;
        }
        buf = rest;
    }
}

/// The bucket: three families of five layers; layers 1–3 have the same bytes
/// in every family (as in the real bucket), 4 and 5 differ.
fn bucket() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (fi, fam) in ["golang", "node", "python"].iter().enumerate() {
        for n in 1..=5u64 {
            let seed = if n <= 3 { n } else { 100 + 10 * fi as u64 + n };
            let len = (600 << 10) + ((n as usize * 131) << 10);
            v.push((format!("images/{fam}/{n}.tar"), tar_layer(seed, len)));
        }
    }
    v
}

/// A cache remote-mounting the origin's bucket `priv` under the same name,
/// so one `--endpoint CACHE,ORIGIN` list serves one bucket name.
fn cache_for(origin_via: &str) -> S3Server {
    let cache = S3Server::start_with(&[
        // Only `pub` of its own (the later -bucket wins): `priv` is the mount.
        "-bucket=pub",
        "-s3.allowUntrustedRemoteEndpoints",
        "-filer.allowUntrustedRemoteEndpoints",
        "-volume.allowUntrustedRemoteEndpoints",
    ]);
    cache.shell(&format!(
        "remote.configure -name=origin -type=s3 -s3.access_key={ACCESS_KEY} -s3.secret_key={SECRET_KEY} \
         -s3.endpoint={origin_via} -s3.region=us-east-1 -s3.force_path_style=true\n\
         remote.mount -dir=/buckets/priv -remote=origin/priv\n"
    ));
    cache
}

fn host(endpoint: &str, srv: &S3Server) -> Thinimg {
    let mut t = Thinimg::new(srv, "priv", "images/");
    t.endpoint = endpoint.to_string();
    t
}

/// Start `HOSTS` fetches of every image at once; returns each host and the
/// wall time until the last one ended.
fn herd(endpoint: &str, srv: &S3Server) -> (Vec<Thinimg>, f64) {
    let hosts: Vec<Thinimg> = (0..HOSTS).map(|_| host(endpoint, srv)).collect();
    let t0 = Instant::now();
    let children: Vec<_> = hosts
        .iter()
        .map(|h| {
            h.command(&["--json", "fetch", "golang", "node", "python"], &[])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawning thinimg")
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().expect("waiting for thinimg");
        assert!(out.status.success(), "host {i} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    (hosts, t0.elapsed().as_secs_f64())
}

fn assert_identical(hosts: &[Thinimg], objects: &[(String, Vec<u8>)]) {
    let want: BTreeSet<String> = objects.iter().map(|(_, d)| sha256_hex(d)).collect();
    for (i, h) in hosts.iter().enumerate() {
        let mut got = BTreeSet::new();
        for f in h.blob_files() {
            let data = std::fs::read(&f).unwrap();
            let digest = sha256_hex(&data);
            assert_eq!(
                f.file_name().unwrap().to_string_lossy(),
                digest,
                "host {i}: blob file {} does not hold the bytes its name claims",
                f.display()
            );
            got.insert(digest);
        }
        assert_eq!(got, want, "host {i}: blobs differ from the origin's objects");
    }
}

#[test]
fn sixteen_hosts_through_a_read_through_cache_read_each_object_from_the_origin_once() {
    let objects = bucket();
    let origin = S3Server::start();
    origin.put_many("priv", &objects);
    let proxy = CountingProxy::start(&origin.endpoint);
    let cache = cache_for(&proxy.endpoint);

    // The cache lists the remote objects with empty ETags until it has read
    // them: the case the hosts must not take as a content claim.
    let listing = common::curl(&[&format!("{}/priv?list-type=2", cache.endpoint)]);
    let xml = String::from_utf8_lossy(&listing.stdout);
    assert!(xml.contains("images/golang/1.tar"), "cache does not list the origin's keys: {xml}");
    assert!(
        xml.contains("<ETag>&#34;&#34;</ETag>") || xml.contains("<ETag>\"\"</ETag>") || xml.contains("<ETag></ETag>"),
        "precondition: the cache's listing should have empty ETags for unread objects: {xml}"
    );

    let (hosts, t_cache) = herd(&cache.endpoint, &cache);
    assert_identical(&hosts, &objects);

    // At the origin: every object read at most once in bytes (one full GET,
    // or ranges that do not overlap), however many hosts asked.
    let reads = proxy.reads();
    let sizes: BTreeMap<String, u64> = objects.iter().map(|(k, d)| (format!("/priv/{k}"), d.len() as u64)).collect();
    let mut report = Vec::new();
    let mut origin_bytes = 0u64;
    for (path, rs) in &reads {
        let size = *sizes.get(path).unwrap_or_else(|| panic!("origin read an unexpected object {path}"));
        let mut bytes = 0u64;
        for r in rs {
            let (a, b) = match r.range {
                None => (0, size - 1),
                Some((a, b)) => (a, b.unwrap_or(size - 1).min(size - 1)),
            };
            bytes += b + 1 - a;
        }
        origin_bytes += bytes;
        report.push(format!("{path}: {} request(s), {bytes} of {size} bytes", rs.len()));
        assert!(bytes <= size, "origin served {path} more than once ({bytes} bytes for a {size}-byte object): {rs:?}");
    }
    // Direct, for the README's numbers: the same herd against the origin.
    let (direct, t_direct) = herd(&origin.endpoint, &origin);
    assert_identical(&direct, &objects);
    let total: u64 = objects.iter().map(|(_, d)| d.len() as u64).sum();
    eprintln!(
        "fleet: {HOSTS} hosts x {} objects ({total} bytes): through the cache {t_cache:.2}s, \
         origin GETs per object max {}, origin bytes {}; direct {t_direct:.2}s, origin bytes {}\n{}",
        objects.len(),
        reads.values().map(|v| v.len()).max().unwrap_or(0),
        origin_bytes,
        total as usize * HOSTS,
        report.join("\n")
    );

    // Fallback, both ways. A second cache, warmed by one host.
    let cache2 = cache_for(&proxy.endpoint);
    host(&cache2.endpoint, &cache2).ok(&["fetch", "golang", "node", "python"]);
    // The first cache stops: `--endpoint CACHE,ORIGIN` falls through to the
    // origin for every request, and says so once.
    cache.stop();
    let h = host(&format!("{},{}", cache.endpoint, origin.endpoint), &origin);
    let r = h.ok(&["fetch", "golang", "node", "python"]);
    assert_eq!(r.stderr.matches("falling back to").count(), 1, "the switch is logged once:\n{}", r.stderr);
    assert!(r.stderr.contains(&origin.endpoint), "{}", r.stderr);
    assert_identical(std::slice::from_ref(&h), &objects);
    // The origin stops: the warm cache keeps serving every object.
    origin.stop();
    let h = host(&format!("{},{}", cache2.endpoint, origin.endpoint), &cache2);
    let r = h.ok(&["fetch", "golang", "node", "python"]);
    assert!(!r.stderr.contains("falling back"), "{}", r.stderr);
    assert_identical(std::slice::from_ref(&h), &objects);
}
