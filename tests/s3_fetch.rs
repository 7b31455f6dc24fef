//! Listing, fetching, resuming and refusing, against a real S3 server
//! (SeaweedFS, SigV4 on) started by the harness. Each test uses its own key
//! prefix and state dir, so they share one server.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{list_page, query_param, reply, sha256_hex, tar_layer, S3Server, ScriptedServer, Thinimg};

fn layer_sources(report: &serde_json::Value) -> Vec<(String, String, u64)> {
    let mut v = Vec::new();
    for img in report["images"].as_array().unwrap() {
        for l in img["layers"].as_array().unwrap() {
            v.push((
                l["key"].as_str().unwrap().to_string(),
                l["source"].as_str().unwrap().to_string(),
                l["transferred"].as_u64().unwrap(),
            ));
        }
    }
    v
}

#[test]
fn sigv4_and_anonymous_buckets_and_auth_errors() {
    let srv = S3Server::shared();
    let l1 = tar_layer(1, 70_000);
    for b in ["priv", "pub"] {
        srv.put(b, "auth/images/alpine/1.tar", &l1);
    }
    // Signed, on the private bucket.
    let t = Thinimg::new(srv, "priv", "auth/images/");
    let r = t.ok(&["fetch", "--json", "alpine"]);
    assert_eq!(r.json()["downloaded"], 1);
    let blob = t.state.join("blobs/sha256").join(sha256_hex(&l1));
    assert_eq!(std::fs::read(&blob).unwrap(), l1);

    // Anonymous, explicitly and because no credentials exist, on the public bucket.
    let t = Thinimg::new(srv, "pub", "auth/images/");
    let r = t.run(&["fetch", "--json", "--anonymous", "alpine"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let t = Thinimg::new(srv, "pub", "auth/images/");
    let r = t.run(&["fetch", "--json", "alpine"], &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("no AWS credentials found"), "{}", r.stderr);

    // Wrong secret: clear message, exit 77.
    let t = Thinimg::new(srv, "priv", "auth/images/");
    let r = t.run(&["ls-remote"], &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("secret key is wrong"), "{}", r.stderr);
    assert!(r.stderr.contains("s3://priv/"), "{}", r.stderr);
    let r = t.run(&["ls-remote"], &[("AWS_ACCESS_KEY_ID", "nosuchkey")]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("access key id is not known"), "{}", r.stderr);
    // Anonymous on the private bucket.
    let r = t.run(&["fetch", "--anonymous", "alpine"], &[]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("access denied"), "{}", r.stderr);
    assert!(!r.stderr.contains("or --anonymous"), "no advice to do what was done: {}", r.stderr);
    assert!(r.stderr.contains("not public"), "{}", r.stderr);
    // An empty listing says where it looked.
    let r = Thinimg::new(srv, "priv", "nothing-here/").run(&["ls-remote"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("no objects under s3://priv/nothing-here/") && r.stderr.contains("--prefix"),
        "{}",
        r.stderr
    );
    // A profile from the shared credentials file.
    let creds = t.home.join("creds");
    std::fs::write(
        &creds,
        format!("[test]\naws_access_key_id = {}\naws_secret_access_key = {}\n", common::ACCESS_KEY, common::SECRET_KEY),
    )
    .unwrap();
    let r = t.run(
        &["ls-remote", "--json"],
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_PROFILE", "test"),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["families"]["alpine"]["layers"].as_array().unwrap().len(), 1);
}

/// Three families × five layers, layers 1–3 identical everywhere and
/// node/4 == python/4: 8 distinct blobs, each transferred exactly once.
#[test]
fn shared_layers_are_downloaded_once() {
    let srv = S3Server::shared();
    let shared: Vec<Vec<u8>> = (1..=3).map(|n| tar_layer(100 + n, 50_000 + n as usize * 1000)).collect();
    let np4 = tar_layer(204, 61_000);
    let mut objects = Vec::new();
    let mut distinct = std::collections::BTreeMap::new();
    for (fi, fam) in ["golang", "node", "python"].iter().enumerate() {
        for n in 1..=5u64 {
            let data = match (fam, n) {
                (_, 1..=3) => shared[n as usize - 1].clone(),
                (&"node" | &"python", 4) => np4.clone(),
                _ => tar_layer(300 + fi as u64 * 10 + n, 40_000 + fi * 3000 + n as usize),
            };
            distinct.insert(sha256_hex(&data), data.len() as u64);
            objects.push((format!("dedupe/images/{fam}/{n}.tar"), data));
        }
    }
    assert_eq!(distinct.len(), 8);
    srv.put_many("priv", &objects);
    let t = Thinimg::new(srv, "priv", "dedupe/images/");
    let r = t.ok(&["fetch", "--json", "golang", "node", "python"]);
    let j = r.json();
    assert_eq!(j["layers"], 15);
    assert_eq!(j["downloaded"], 8, "{j:#}");
    assert_eq!(j["deduped"], 7);
    assert_eq!(j["bytes_transferred"].as_u64().unwrap(), distinct.values().sum::<u64>());
    let files: Vec<String> =
        t.blob_files().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(files, distinct.keys().cloned().collect::<Vec<_>>());
    for img in j["images"].as_array().unwrap() {
        for l in img["layers"].as_array().unwrap() {
            let key = l["key"].as_str().unwrap();
            let data = &objects.iter().find(|(k, _)| k == key).unwrap().1;
            assert_eq!(l["digest"].as_str().unwrap(), sha256_hex(data), "{key}");
        }
    }
    // Again: nothing moves.
    let j = t.ok(&["fetch", "--json", "golang", "node", "python"]).json();
    assert_eq!(j["cached"], 15);
    assert_eq!(j["bytes_transferred"], 0);
    // Another state dir, one family at a time: node's shared layers come
    // from the store (by ETag), not the network.
    let t2 = Thinimg::new(srv, "priv", "dedupe/images/");
    t2.ok(&["fetch", "golang"]);
    let j = t2.ok(&["fetch", "--json", "node/5.tar"]).json();
    let src = layer_sources(&j);
    assert_eq!(src.iter().filter(|s| s.1 == "deduped").count(), 3, "{src:?}");
    assert_eq!(src.iter().filter(|s| s.1 == "downloaded").count(), 2, "{src:?}");
    // blobs lists every key per digest.
    let b = t.ok(&["blobs", "--json"]).json();
    let arr = b["blobs"].as_array().unwrap();
    assert_eq!(arr.len(), 8);
    let l1 = arr.iter().find(|x| x["digest"] == sha256_hex(&shared[0])).unwrap();
    assert_eq!(l1["keys"].as_array().unwrap().len(), 3);
}

#[test]
fn kill_mid_download_resumes_with_only_the_remainder() {
    let srv = S3Server::shared();
    let big = tar_layer(7, 40 << 20);
    srv.put("priv", "resume/images/big/1.tar", &big);
    let t = Thinimg::new(srv, "priv", "resume/images/");
    // Die right after the second checkpoint (32 MiB durable).
    let r = t.run(&["fetch", "--json", "big"], &[("THINIMG_FAULT", "download:chunk"), ("THINIMG_FAULT_SKIP", "1")]);
    assert_eq!(r.code, -1, "expected SIGKILL: {}", r.stderr);
    assert!(t.blob_files().is_empty());
    let j = t.ok(&["fetch", "--json", "big"]).json();
    let l = &j["images"][0]["layers"][0];
    // The second checkpoint is requested at the first read boundary past
    // 32 MiB (later if the first fsync is still running).
    let resumed = l["resumed_from"].as_u64().unwrap();
    assert!(resumed >= 32 << 20 && resumed < big.len() as u64, "{j:#}");
    assert_eq!(l["transferred"].as_u64().unwrap(), big.len() as u64 - resumed);
    assert_eq!(j["bytes_transferred"].as_u64().unwrap(), big.len() as u64 - resumed);
    assert_eq!(l["digest"].as_str().unwrap(), sha256_hex(&big));
    assert_eq!(std::fs::read(t.state.join("blobs/sha256").join(sha256_hex(&big))).unwrap(), big);
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0);

    // Killed after the rename, before the database knew: adopted, not redone.
    let t = Thinimg::new(srv, "priv", "resume/images/");
    let r = t.run(&["fetch", "big"], &[("THINIMG_FAULT", "download:renamed")]);
    assert_eq!(r.code, -1, "{}", r.stderr);
    let j = t.ok(&["fetch", "--json", "big"]).json();
    assert_eq!(j["bytes_transferred"], 0, "{j:#}");
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&big));
}

#[test]
fn object_changed_between_runs_restarts_cleanly() {
    let srv = S3Server::shared();
    let v1 = tar_layer(8, 24 << 20);
    let v2 = tar_layer(9, 20 << 20);
    srv.put("priv", "changed/images/c/1.tar", &v1);
    let t = Thinimg::new(srv, "priv", "changed/images/");
    let r = t.run(&["fetch", "c"], &[("THINIMG_FAULT", "download:chunk")]);
    assert_eq!(r.code, -1, "{}", r.stderr);
    srv.put("priv", "changed/images/c/1.tar", &v2);
    let j = t.ok(&["fetch", "--json", "c"]).json();
    let l = &j["images"][0]["layers"][0];
    assert_eq!(l["resumed_from"], 0, "{j:#}");
    assert_eq!(l["transferred"].as_u64().unwrap(), v2.len() as u64);
    assert_eq!(l["digest"].as_str().unwrap(), sha256_hex(&v2));
    assert_eq!(t.blob_files().len(), 1);
}

#[test]
fn corrupt_blob_is_detected_and_fetched_again() {
    let srv = S3Server::shared();
    let data = tar_layer(11, 300_000);
    srv.put("priv", "corrupt/images/x/1.tar", &data);
    let t = Thinimg::new(srv, "priv", "corrupt/images/");
    t.ok(&["fetch", "x"]);
    let blob = t.state.join("blobs/sha256").join(sha256_hex(&data));
    // Same size, one byte flipped: only a re-hash sees it.
    let mut bad = data.clone();
    bad[100_000] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    assert_eq!(t.ok(&["fetch", "--json", "x"]).json()["cached"], 1, "without --verify a same-size blob is trusted");
    let j = t.ok(&["fetch", "--json", "--verify", "x"]).json();
    assert_eq!(j["downloaded"], 1, "{j:#}");
    assert_eq!(j["bytes_transferred"].as_u64().unwrap(), data.len() as u64);
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    // Truncated: the size check on every fetch sees it.
    std::fs::write(&blob, &data[..1000]).unwrap();
    let j = t.ok(&["fetch", "--json", "x"]).json();
    assert_eq!(j["downloaded"], 1, "{j:#}");
    assert_eq!(std::fs::read(&blob).unwrap(), data);
}

#[test]
fn hostile_keys_and_bad_objects() {
    let srv = S3Server::shared();
    let p = "hostile/images/";
    let good = tar_layer(21, 10_000);
    // SeaweedFS caps a path component at 255 bytes: a 1000-byte key is
    // built from several long components.
    let long_key =
        format!("{p}{}/{}/{}/1.tar", "f".repeat(250), "d".repeat(250), "e".repeat(1000 - p.len() - 250 - 250 - 8));
    let long_name = format!("{p}golang/{}.tar", "9".repeat(240));
    let keys = [
        format!("{p}golang/1.tar"),
        long_name.clone(),
        long_key.clone(),
        format!("{p}gölang/1.tar"),
        format!("{p}a+b/1.tar"),
        format!("{p}sp ace/1.tar"),
        format!("{p}pct%2e%2e/1.tar"),
        format!("{p}.../1.tar"),
        format!("{p}golang/2 .tar"),
        format!("{p}golang/sub/1.tar"),
        format!("{p}golang/+1.tar"),
        format!("{p}README"),
    ];
    for k in &keys {
        srv.put("priv", k, &good);
    }
    // The server itself refuses dot-dot segments; if it ever stores one,
    // the listing below must still classify it.
    let dotdot = srv.try_put("priv", &format!("{p}../escape/1.tar"), &good);
    let t = Thinimg::new(srv, "priv", p);
    let j = t.ok(&["ls-remote", "--json"]).json();
    let fams: Vec<&String> = j["families"].as_object().unwrap().keys().collect();
    assert_eq!(fams, vec!["golang"], "{j:#}");
    let ignored = j["ignored"].as_array().unwrap();
    assert_eq!(ignored.len(), keys.len() - 1 + dotdot as usize, "{j:#}");
    for i in ignored {
        assert!(!i["reason"].as_str().unwrap().is_empty());
    }
    let reason = |k: &str| {
        ignored
            .iter()
            .find(|i| i["key"] == k)
            .map(|i| i["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{k} not ignored"))
    };
    assert!(reason(&long_name).contains("larger than"));
    assert_eq!(long_key.len(), 1000);
    assert!(reason(&long_key).contains("250 bytes"));
    assert!(reason(&format!("{p}gölang/1.tar")).contains("characters"));
    assert!(reason(&format!("{p}golang/sub/1.tar")).contains("nested"));
    let text = t.ok(&["ls-remote"]).stdout;
    assert!(text.contains("IGNORED") && text.contains("README"), "{text}");
    t.ok(&["fetch", "golang"]);
    // Nothing but the state dir appeared next to it, and inside it only the
    // db, the lock and content-addressed or id-named files.
    let parent = t.state.parent().unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["home", "state"]);
    for e in walk(&t.state) {
        let n = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            n.len() == 64
                || n.starts_with("state.db")
                || n == "lock"
                || ["blobs", "sha256", "partial"].contains(&n.as_str()),
            "unexpected file {}",
            e.display()
        );
    }

    // Compressed, foreign and truncated objects: exit 65 naming the key.
    let gz = {
        let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        v.extend(common::noise(1, 5000));
        v
    };
    srv.put("priv", &format!("{p}gz/1.tar"), &gz);
    srv.put("priv", &format!("{p}junk/1.tar"), &common::noise(2, 100_000));
    srv.put("priv", &format!("{p}short/1.tar"), b"too short");
    for (fam, what) in [
        ("gz", "is gzip-compressed; only uncompressed tar layers are supported"),
        ("junk", "not a tar archive"),
        ("short", "truncated"),
    ] {
        let r = t.run(&["fetch", fam], &[]);
        assert_eq!(r.code, 65, "{fam}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("s3://priv/{p}{fam}/1.tar")), "{}", r.stderr);
        assert!(r.stderr.contains(what), "{}", r.stderr);
    }
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0);

    // A gap names the missing layer; the layers below it are still usable.
    srv.put("priv", &format!("{p}gap/1.tar"), &good);
    srv.put("priv", &format!("{p}gap/3.tar"), &tar_layer(22, 1000));
    let r = t.run(&["fetch", "gap"], &[]);
    assert_eq!(r.code, 66, "a gap is \"no such layer\": {}", r.stderr);
    assert!(r.stderr.contains("layer 2 is missing") && r.stderr.contains(&format!("{p}gap/2.tar")), "{}", r.stderr);
    assert!(r.stderr.contains("gap/1 (layers 1-1) is complete"), "names the ref that works: {}", r.stderr);
    t.ok(&["fetch", "gap/1"]);
    let j = t.ok(&["ls-remote", "--json", "gap"]).json();
    assert!(j["families"]["gap"]["invalid"].as_str().unwrap().contains("layer 2 is missing"));
    // stat of one key (the HEAD equivalent) and of a missing one.
    let cfg = thinimg::fetch::s3::S3Config {
        bucket: "priv".into(),
        prefix: p.into(),
        region: "us-east-1".into(),
        endpoints: vec![srv.endpoint.clone()],
        anonymous: false,
        timeout: std::time::Duration::from_secs(10),
        retries: 2,
    };
    std::env::set_var("AWS_ACCESS_KEY_ID", common::ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", common::SECRET_KEY);
    let client = thinimg::fetch::s3::S3Client::new(cfg).unwrap();
    let st = client.stat(&format!("{p}gap/3.tar")).unwrap();
    assert_eq!(st.size, tar_layer(22, 1000).len() as u64);
    assert_eq!(st.etag.len(), 32);
    let e = client.stat(&format!("{p}gap/2.tar")).unwrap_err();
    assert_eq!(e.kind(), thinimg::Kind::NoSuchImage);
    assert!(e.message().contains(&format!("s3://priv/{p}gap/2.tar")), "{}", e.message());
    // Unknown family and layer: 66.
    assert_eq!(t.run(&["fetch", "nope"], &[]).code, 66);
    assert_eq!(t.run(&["fetch", "golang/7"], &[]).code, 66);
    // Too big for --max-blob-size: 65 naming the key.
    let r = t.run(&["fetch", "--max-blob-size", "1K", "gap/1"], &[]);
    assert_eq!(r.code, 0, "already stored: no download, no size check needed: {}", r.stderr);
    let t2 = Thinimg::new(srv, "priv", p);
    let r = t2.run(&["fetch", "--max-blob-size", "1K", "gap/1"], &[]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("s3://priv/{p}gap/1.tar")) && r.stderr.contains("max-blob-size"),
        "{}",
        r.stderr
    );
}

#[test]
fn listing_follows_pagination() {
    let srv = S3Server::shared();
    let layer = tar_layer(31, 600);
    let objects: Vec<(String, Vec<u8>)> =
        (1..=1005).map(|n| (format!("many/images/wide/{n}.tar"), layer.clone())).collect();
    srv.put_many("priv", &objects);
    let t = Thinimg::new(srv, "priv", "many/images/");
    let j = t.ok(&["ls-remote", "--json"]).json();
    let layers = j["families"]["wide"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1005, "more than one 1000-key page");
    assert_eq!(layers[1004]["n"], 1005);
    assert!(j["families"]["wide"]["invalid"].is_null());
    // Smaller pages, many continuation tokens, same answer.
    let r = t.run(&["ls-remote", "--json"], &[("THINIMG_S3_MAX_KEYS", "97")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["families"]["wide"]["layers"].as_array().unwrap().len(), 1005);
    // 1005 keys with one content: one blob.
    let j = t.ok(&["fetch", "--json", "wide/40"]).json();
    assert_eq!(j["downloaded"], 1);
    assert_eq!(j["deduped"], 39);
    assert_eq!(t.blob_files().len(), 1);
}

#[test]
fn blobs_on_a_missing_state_dir_is_empty() {
    let srv = S3Server::shared();
    let t = Thinimg::new(srv, "priv", "none/");
    let r = t.ok(&["blobs", "--json"]);
    assert_eq!(r.json(), serde_json::json!({ "blobs": [] }));
    assert!(!t.state.join("state.db").exists());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn dropped_connections_and_slowdown_are_retried() {
    let srv = S3Server::shared();
    let data = tar_layer(41, 12 << 20);
    srv.put("priv", "faults/images/f/1.tar", &data);
    let proxy = common::FaultProxy::start(&srv.endpoint);
    let mut t = Thinimg::new(srv, "priv", "faults/images/");
    t.endpoint = proxy.endpoint.clone();
    // Two connections cut mid-body (short bodies), then a clean one.
    proxy.plan().cut_after.extend([3 << 20, 5 << 20]);
    let r = t.run(&["fetch", "--json", "f"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    let l = &j["images"][0]["layers"][0];
    assert_eq!(l["digest"].as_str().unwrap(), sha256_hex(&data));
    // Each cut resumed where it stopped: not one byte fetched twice.
    assert_eq!(l["transferred"].as_u64().unwrap(), data.len() as u64, "{j:#}");
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);
    assert!(proxy.plan().connections >= 3);

    // 503 SlowDown twice: retried with backoff, then it works.
    let t2 = Thinimg { endpoint: proxy.endpoint.clone(), ..Thinimg::new(srv, "priv", "faults/images/") };
    proxy.plan().fail_503 = 2;
    let r = t2.run(&["fetch", "f"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("SlowDown"), "{}", r.stderr);
    // SlowDown that never ends: bounded attempts, then exit 69.
    let t3 = Thinimg { endpoint: proxy.endpoint.clone(), ..Thinimg::new(srv, "priv", "faults/images/") };
    proxy.plan().fail_503 = 1000;
    let r = t3.run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("giving up after 3 attempts"), "default --retries 2: {}", r.stderr);
    let r = t3.run(&["ls-remote", "--retries", "0"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("giving up after 1 attempts"), "{}", r.stderr);
    assert!(r.stderr.contains(&proxy.endpoint), "the endpoint is named: {}", r.stderr);
    proxy.plan().fail_503 = 0;
}

/// The object changed between the listing and the GET: If-Match fails
/// (412) and the download restarts cleanly from byte 0, also when it was
/// resuming a partial of the old version.
/// A signed client of bucket `priv` under `prefix` on the test server.
fn signed_client(srv: &S3Server, prefix: &str) -> thinimg::fetch::s3::S3Client {
    std::env::set_var("AWS_ACCESS_KEY_ID", common::ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", common::SECRET_KEY);
    thinimg::fetch::s3::S3Client::new(thinimg::fetch::s3::S3Config {
        bucket: "priv".into(),
        prefix: prefix.into(),
        region: "us-east-1".into(),
        endpoints: vec![srv.endpoint.clone()],
        anonymous: false,
        timeout: std::time::Duration::from_secs(10),
        retries: 2,
    })
    .unwrap()
}

#[test]
fn precondition_failed_restarts_from_zero() {
    use thinimg::fetch::{
        blobstore::BlobStore,
        download::{DownloadJob, Progress},
    };
    let srv = S3Server::shared();
    let data = tar_layer(51, 3 << 20);
    let key = "precond/images/p/1.tar";
    srv.put("priv", key, &data);
    let client = signed_client(srv, "precond/images/");
    let real_etag = client.stat(key).unwrap().etag;
    let state = common::tempdir("precond");
    let store = BlobStore::open(&state).unwrap();
    // A partial of "the old version": 1 MiB of other bytes.
    std::fs::write(state.join("blobs/partial/7.partial"), common::noise(5, 1 << 20)).unwrap();
    for (partial, resume) in [("7.partial", 1u64 << 20), ("8.partial", 0)] {
        let stale = "0123456789abcdef0123456789abcdef";
        let job = DownloadJob {
            key,
            etag: stale,
            size: data.len() as u64,
            partial,
            resume_offset: resume,
            max_size: 1 << 30,
            counter: None,
            tap: None,
        };
        let mut events = Vec::new();
        let d = store
            .download(&client, &job, &mut |p| {
                if let Progress::Durable { offset, etag, .. } = p {
                    events.push((offset, etag.to_string()));
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(d.digest.as_str(), sha256_hex(&data), "{partial}");
        assert_eq!(d.etag, real_etag);
        assert_eq!(d.transferred, data.len() as u64);
        assert_eq!(d.resumed_from, 0, "the old version's bytes were not reused");
        assert_eq!(events.first().map(|e| e.0), Some(0), "restart recorded as durable offset 0: {events:?}");
        assert_eq!(std::fs::read(store.blob_path(&d.digest)).unwrap(), data);
        assert!(!state.join("blobs/partial").join(partial).exists());
    }
    std::fs::remove_dir_all(&state).ok();
}

#[test]
fn fetch_takes_the_state_lock_and_blobs_does_not() {
    let srv = S3Server::shared();
    srv.put("priv", "lock/images/l/1.tar", &tar_layer(61, 5000));
    let t = Thinimg::new(srv, "priv", "lock/images/");
    t.ok(&["fetch", "l"]);
    let held = thinimg::ops::lock::StateLock::acquire(&t.state, None).unwrap();
    let r = t.run(&["fetch", "l"], &[]);
    assert_eq!(r.code, 75, "{}", r.stderr);
    assert!(r.stderr.contains("another thinimg instance"), "{}", r.stderr);
    // Read-only: works while the lock is held.
    let b = t.ok(&["blobs", "--json"]).json();
    assert_eq!(b["blobs"].as_array().unwrap().len(), 1);
    // --wait: succeeds once the holder lets go.
    let mut child = t
        .command(&["fetch", "--wait", "30", "l"], &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(held);
    assert!(child.wait().unwrap().success());
}

/// SIGINT mid-download: exit 130 after making the received bytes durable;
/// the next run resumes from there.
#[test]
fn sigint_checkpoints_and_the_next_run_resumes() {
    let srv = S3Server::shared();
    let big = tar_layer(71, 96 << 20);
    srv.put("priv", "sigint/images/s/1.tar", &big);
    let t = Thinimg::new(srv, "priv", "sigint/images/");
    let mut child = t.command(&["fetch", "s"], &[]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let partial_dir = t.state.join("blobs/partial");
    let t0 = std::time::Instant::now();
    loop {
        let grown = std::fs::read_dir(&partial_dir)
            .map(|d| d.flatten().any(|e| e.metadata().map(|m| m.len() > (4 << 20)).unwrap_or(false)))
            .unwrap_or(false);
        if grown {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "download never started");
        assert!(child.try_wait().unwrap().is_none(), "fetch finished before it could be interrupted");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    let j = t.ok(&["fetch", "--json", "s"]).json();
    let l = &j["images"][0]["layers"][0];
    let resumed = l["resumed_from"].as_u64().unwrap();
    assert!(resumed > 4 << 20, "the bytes received before SIGINT were kept: {j:#}");
    assert_eq!(l["transferred"].as_u64().unwrap() + resumed, big.len() as u64);
    assert_eq!(l["digest"].as_str().unwrap(), sha256_hex(&big));
}

/// A Thinimg aimed at a scripted server instead of SeaweedFS.
fn against(endpoint: &str) -> Thinimg {
    let mut t = Thinimg::new(S3Server::shared(), "bkt", "images/");
    t.endpoint = endpoint.to_string();
    t
}

fn keys(family: &str, n: u64) -> Vec<(String, u64)> {
    (1..=n).map(|i| (format!("images/{family}/{i}.tar"), 1000 + i)).collect()
}

/// Continuation tokens that cycle (with other cycle lengths than the
/// review's A,B,A): refused at the first repeat, after one pass.
#[test]
fn a_listing_that_cycles_its_tokens_is_refused() {
    for cycle in [1usize, 2, 5] {
        let srv = ScriptedServer::start(move |line, conn| {
            let next = match query_param(line, "continuation-token") {
                None => 0,
                Some(t) => t.trim_start_matches('T').parse::<usize>().unwrap() + 1,
            };
            let token = format!("T{}", next % cycle);
            reply(conn, "200 OK", list_page(&keys(&format!("f{next}"), 50), Some(&token)).as_bytes());
        });
        let t = against(&srv.endpoint);
        let t0 = Instant::now();
        let r = t.run(&["ls-remote"], &[]);
        assert_eq!(r.code, 69, "{}", r.stderr);
        assert!(r.stderr.contains("repeats the continuation token"), "{}", r.stderr);
        assert!(r.stderr.contains(&srv.endpoint), "names the endpoint: {}", r.stderr);
        assert_eq!(srv.count(), cycle as u64 + 1, "one pass of the cycle, then stop");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

/// Fresh tokens for ever: the page cap ends it, with bounded memory.
#[test]
fn a_listing_that_never_ends_is_capped() {
    let srv = ScriptedServer::start(|line, conn| {
        let next = query_param(line, "continuation-token").map(|t| t.parse::<u64>().unwrap() + 1).unwrap_or(0);
        reply(conn, "200 OK", list_page(&keys("wide", 1), Some(&next.to_string())).as_bytes());
    });
    let t = against(&srv.endpoint);
    let r = t.run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("pages (limit)"), "{}", r.stderr);
    assert_eq!(srv.count(), thinimg::fetch::s3::MAX_LIST_PAGES);
    // Many keys per page: the key cap ends it first.
    let srv = ScriptedServer::start(|line, conn| {
        let next = query_param(line, "continuation-token").map(|t| t.parse::<u64>().unwrap() + 1).unwrap_or(0);
        let ks: Vec<(String, u64)> = (0..1000).map(|i| (format!("images/f{next}/{}.tar", i + 1), 10)).collect();
        reply(conn, "200 OK", list_page(&ks, Some(&next.to_string())).as_bytes());
    });
    let r = against(&srv.endpoint).run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("objects (limit)"), "{}", r.stderr);
    assert!(srv.count() <= (thinimg::fetch::s3::MAX_LIST_KEYS / 1000) as u64 + 1);
}

/// An oversized listing is a permanent error: asked for once, not retried.
#[test]
fn an_oversized_listing_is_not_retried() {
    let srv = ScriptedServer::start(|_, conn| {
        let len = thinimg::fetch::s3::MAX_XML_BODY + 1;
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n<ListBucketResult>");
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 18u64;
        while sent < len {
            let n = (len - sent).min(chunk.len() as u64) as usize;
            if conn.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
    });
    let r = against(&srv.endpoint).run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("larger than"), "{}", r.stderr);
    assert!(!r.stderr.contains("retrying"), "{}", r.stderr);
    assert_eq!(srv.count(), 1);
}

/// A server that trickles a valid reply, or accepts and never answers,
/// is cut off by the overall deadline, not only by a per-read timeout.
#[test]
fn stalled_and_trickling_servers_fail_in_bounded_time() {
    let page = list_page(&keys("go", 1), None);
    let trickle = ScriptedServer::start(move |_, conn| {
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", page.len());
        for b in page.bytes() {
            if conn.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let t = against(&trickle.endpoint);
    let t0 = Instant::now();
    let r = t.run(&["ls-remote", "--timeout", "2", "--retries", "1"], &[]);
    let took = t0.elapsed();
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(took < Duration::from_secs(9), "took {took:?}: {}", r.stderr);
    assert!(r.stderr.contains("--timeout") && r.stderr.contains(&trickle.endpoint), "{}", r.stderr);
    assert_eq!(trickle.count(), 2);

    // Accepts, reads the request, never answers: the defaults end it well
    // under a minute (the review measured 370 s).
    let silent = ScriptedServer::start(|_, _conn| std::thread::sleep(Duration::from_secs(600)));
    let t = against(&silent.endpoint);
    let t0 = Instant::now();
    let r = t.run(&["ls-remote"], &[]);
    let took = t0.elapsed();
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(took < Duration::from_secs(40), "took {took:?}: {}", r.stderr);
    assert!(r.stderr.contains(&silent.endpoint), "names the endpoint: {}", r.stderr);
    // The flags are accepted by other commands that talk to S3, and checked.
    let r = t.run(&["fetch", "--timeout", "1", "--retries", "0", "go"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    for bad in [["--timeout", "0"], ["--timeout", "2h"], ["--retries", "-1"], ["--retries", "99"]] {
        let r = t.run(&["ls-remote", bad[0], bad[1]], &[]);
        assert_eq!(r.code, 64, "{bad:?}: {}", r.stderr);
    }
}

/// Escape sequences in an S3 error never reach the terminal, the log or the
/// journal; a key listed twice is diagnosed as such.
#[test]
fn server_text_is_escaped_and_duplicate_keys_are_named() {
    let srv = ScriptedServer::start(|line, conn| {
        if line.contains("list-type") {
            let mut ks = keys("go", 3);
            ks.insert(2, ("images/go/2.tar".into(), 1002));
            reply(conn, "200 OK", list_page(&ks, None).as_bytes());
        } else {
            let body = "<Error><Code>Internal\u{1b}]0;x\u{7}Error</Code><Message>\u{1b}[31mred\u{1b}[0m\nthinimg: error: injected line\r</Message></Error>";
            reply(conn, "500 Internal Server Error", body.as_bytes());
        }
    });
    let t = against(&srv.endpoint);
    let r = t.run(&["fetch", "go/1", "--retries", "1"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(!r.stderr.contains('\u{1b}') && !r.stderr.contains('\r') && !r.stderr.contains('\u{7}'), "{:?}", r.stderr);
    assert!(r.stderr.contains("\\u{1b}[31mred"), "{}", r.stderr);
    assert_eq!(
        r.stderr.lines().filter(|l| l.contains("injected line")).count(),
        2,
        "one warning, one error: {}",
        r.stderr
    );
    let r = t.run(&["fetch", "go"], &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("images/go/2.tar more than once"), "{}", r.stderr);
    assert!(!r.stderr.contains("missing"), "{}", r.stderr);
}

/// TLS spoken to a plain-HTTP port, and a web server that is not S3 (the
/// filer), are named as such, at once, without retries.
#[test]
fn wrong_endpoints_are_named() {
    let srv = S3Server::shared();
    let mut t = Thinimg::new(srv, "priv", "wrong/images/");
    t.endpoint = srv.endpoint.replacen("http://", "https://", 1);
    let t0 = Instant::now();
    let r = t.run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("TLS handshake") && r.stderr.contains(&srv.endpoint), "{}", r.stderr);
    assert!(!r.stderr.contains("retrying"), "{}", r.stderr);
    assert!(t0.elapsed() < Duration::from_secs(5));
    t.endpoint = srv.filer.clone();
    let r = t.run(&["ls-remote"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not look like an S3 endpoint") || r.stderr.contains("an S3 endpoint?"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&srv.filer), "{}", r.stderr);
    t.endpoint = "http://127.0.0.1:1".into();
    let r = t.run(&["ls-remote", "--retries", "0"], &[]);
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains("http://127.0.0.1:1"), "{}", r.stderr);
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for ch in bytes.chunks(3) {
        let n =
            (u32::from(ch[0]) << 16) | (u32::from(*ch.get(1).unwrap_or(&0)) << 8) | u32::from(*ch.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= ch.len() { A[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn sha256_bytes(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

/// The review's dedupe poisoning (M4) and splice-between-ranges: a server
/// whose ETag claims one content and serves another never gets its bytes
/// stored, and never decides the content of another bucket's key.
#[test]
fn bytes_that_do_not_match_their_etag_are_never_stored() {
    let srv = S3Server::shared();
    let real = tar_layer(81, 300_000);
    srv.put("priv", "poison/images/golang/1.tar", &real);
    let evil = common::TinyS3::start("bkt");
    // Same size, the MD5 of b's real layer as ETag, other bytes.
    let other = tar_layer(82, 300_000);
    assert_eq!(other.len(), real.len());
    evil.put(
        "images/evil/1.tar",
        common::Served {
            first: other.clone(),
            ranged: other.clone(),
            etag: common::md5_hex(&real),
            ..Default::default()
        },
    );
    let mut t = against(&evil.server.endpoint);
    let r = t.run(&["fetch", "evil"], &[]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("do not match the object's ETag"), "{}", r.stderr);
    assert!(t.blob_files().is_empty(), "nothing stored");
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0, "nothing kept");
    // The trusted bucket's key is downloaded and is the real content.
    t.endpoint = srv.endpoint.clone();
    t.bucket = "priv".into();
    t.prefix = "poison/images/".into();
    let j = t.ok(&["fetch", "--json", "golang"]).json();
    assert_eq!(j["downloaded"], 1, "{j:#}");
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&real));

    // Splice: the first GET is cut, the resumed range comes from other
    // bytes under the same ETag. Refused, nothing stored; the same server
    // resuming honestly works (the test server is sound).
    for (ranged, ok) in [(other.clone(), false), (real.clone(), true)] {
        let s = common::TinyS3::start("bkt");
        let cut = 100_000 + (ranged[0] as usize % 1000);
        s.put(
            "images/sp/1.tar",
            common::Served {
                first: real.clone(),
                ranged,
                etag: common::md5_hex(&real),
                cut_first_at: Some(cut),
                ..Default::default()
            },
        );
        let t = against(&s.server.endpoint);
        let r = t.run(&["fetch", "--json", "sp"], &[]);
        assert!(s.gets_of("images/sp/1.tar") >= 2, "the download resumed");
        if ok {
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert_eq!(r.json()["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&real));
        } else {
            assert_eq!(r.code, 65, "{}", r.stderr);
            assert!(r.stderr.contains("do not match the object's ETag"), "{}", r.stderr);
            assert!(t.blob_files().is_empty());
            assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0);
        }
    }

    // x-amz-checksum-sha256 is checked when the server sends it (here with
    // a multipart-style ETag, which says nothing about the bytes).
    for (sum, ok) in [(base64(&sha256_bytes(&other)), false), (base64(&sha256_bytes(&real)), true)] {
        let s = common::TinyS3::start("bkt");
        s.put(
            "images/ck/1.tar",
            common::Served {
                first: real.clone(),
                ranged: real.clone(),
                etag: format!("{}-2", common::md5_hex(&other)),
                headers: vec![("x-amz-checksum-sha256".into(), sum)],
                ..Default::default()
            },
        );
        let t = against(&s.server.endpoint);
        let r = t.run(&["fetch", "ck"], &[]);
        if ok {
            assert_eq!(r.code, 0, "{}", r.stderr);
        } else {
            assert_eq!(r.code, 65, "{}", r.stderr);
            assert!(r.stderr.contains("x-amz-checksum-sha256"), "{}", r.stderr);
            assert!(t.blob_files().is_empty());
        }
    }
}

/// Content is reused by ETag only within one endpoint and bucket.
#[test]
fn dedupe_stays_within_one_bucket() {
    let srv = S3Server::shared();
    let data = tar_layer(83, 200_000);
    srv.put("pub", "scope/images/a/1.tar", &data);
    srv.put("priv", "scope/images/b/1.tar", &data);
    srv.put("priv", "scope/images/c/1.tar", &data);
    let t = Thinimg::new(srv, "pub", "scope/images/");
    assert_eq!(t.ok(&["fetch", "--json", "a"]).json()["downloaded"], 1);
    let t = Thinimg { bucket: "priv".into(), ..t };
    let j = t.ok(&["fetch", "--json", "b"]).json();
    assert_eq!(j["downloaded"], 1, "another bucket's ETag is not trusted: {j:#}");
    let j = t.ok(&["fetch", "--json", "c"]).json();
    assert_eq!(j["deduped"], 1, "the same bucket's verified ETag is: {j:#}");
    assert_eq!(t.blob_files().len(), 1);
}

fn reject_in_db(t: &Thinimg, digest: &str, why: &str) {
    let c = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    let n = c
        .execute("UPDATE blobs SET state = 'rejected', reason = ?1 WHERE digest = ?2", rusqlite::params![why, digest])
        .unwrap();
    assert_eq!(n, 1);
}

/// M6: a rejected layer is checked before downloading (by key, ETag and
/// size, and by digest), is never flipped back by a re-fetch, is shown with
/// its reason, and is cleared by the operator command or a change of the
/// object.
#[test]
fn a_rejected_layer_stays_rejected() {
    let data = tar_layer(84, 150_000);
    let s = common::TinyS3::start("bkt");
    let served = |d: &Vec<u8>| common::Served {
        first: d.clone(),
        ranged: d.clone(),
        etag: common::md5_hex(d),
        ..Default::default()
    };
    s.put("images/x/1.tar", served(&data));
    let t = against(&s.server.endpoint);
    t.ok(&["fetch", "x"]);
    assert_eq!(s.gets_of("images/x/1.tar"), 1);
    let digest = sha256_hex(&data);
    reject_in_db(&t, &digest, "rule xyz: hostile");
    for args in [&["fetch", "x"][..], &["fetch", "--verify", "x"][..]] {
        let r = t.run(args, &[]);
        assert_eq!(r.code, 65, "{}", r.stderr);
        assert!(r.stderr.contains("rejected earlier") && r.stderr.contains("rule xyz: hostile"), "{}", r.stderr);
    }
    assert_eq!(s.gets_of("images/x/1.tar"), 1, "not downloaded again");
    // Another key with the same bytes: downloaded (nothing says it is the
    // same), then refused by digest, and the rejection holds.
    s.put("images/y/1.tar", served(&data));
    let r = t.run(&["fetch", "y"], &[]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("rule xyz: hostile"), "{}", r.stderr);
    let r = t.run(&["fetch", "y"], &[]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert_eq!(s.gets_of("images/y/1.tar"), 1, "known by key now: not downloaded again");
    let b = t.ok(&["blobs", "--json"]).json();
    let row = b["blobs"].as_array().unwrap().iter().find(|x| x["digest"] == digest.as_str()).unwrap().clone();
    assert_eq!(row["state"], "rejected", "{b:#}");
    assert_eq!(row["reason"], "rule xyz: hostile", "{b:#}");
    assert!(t.ok(&["blobs"]).stdout.contains("rule xyz: hostile"));
    // gc keeps the rejection.
    t.ok(&["gc"]);
    assert_eq!(t.run(&["fetch", "x"], &[]).code, 65);
    // A change of the object: a new version is fetched.
    let v2 = tar_layer(85, 150_000);
    s.put("images/x/1.tar", served(&v2));
    let j = t.ok(&["fetch", "--json", "x"]).json();
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&v2));
    // The operator clears the rejection: y is fetched again.
    let r = t.run(&["blobs", "--clear-rejection", &"0".repeat(64)], &[]);
    assert_eq!(r.code, 66, "not a rejected blob: {}", r.stderr);
    t.ok(&["blobs", "--clear-rejection", &digest]);
    let j = t.ok(&["fetch", "--json", "y"]).json();
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), digest);
}

fn age_objects(t: &Thinimg, secs: i64) {
    let c = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    c.execute("UPDATE objects SET fetched_at = fetched_at - ?1", [secs]).unwrap();
}

/// Blobs that fetch stored survive gc until the retention rule (7 days
/// without a fetch using them) says otherwise; blobs only pulled are not
/// retained (rm then gc frees them).
#[test]
fn fetch_and_gc_do_not_undo_each_other() {
    let srv = S3Server::shared();
    let a = tar_layer(91, 100_000);
    let b = tar_layer(92, 120_000);
    srv.put("priv", "retain/images/r/1.tar", &a);
    srv.put("priv", "retain/images/r/2.tar", &b);
    let t = Thinimg::new(srv, "priv", "retain/images/");
    t.ok(&["fetch", "r"]);
    let j = t.ok(&["gc", "--json"]).json();
    assert_eq!(j["unused_blobs"].as_array().unwrap().len(), 0, "{j:#}");
    assert_eq!(t.blob_files().len(), 2);
    // Six days later a fetch uses them again: the clock starts over.
    age_objects(&t, 6 * 86400);
    assert_eq!(t.ok(&["fetch", "--json", "r"]).json()["cached"], 2);
    age_objects(&t, 6 * 86400);
    t.ok(&["gc"]);
    assert_eq!(t.blob_files().len(), 2, "used by a fetch 6 days ago: kept");
    // Only layer 1 is fetched again; eight days on, layer 2 goes.
    t.ok(&["fetch", "r/1"]);
    age_objects(&t, 2 * 86400);
    let j = t.ok(&["gc", "--json"]).json();
    assert_eq!(j["unused_blobs"].as_array().unwrap().len(), 1, "{j:#}");
    assert_eq!(j["unused_blobs"][0].as_str().unwrap(), sha256_hex(&b));
    assert_eq!(t.blob_files().len(), 1);
}

/// Space: a download that would eat into --min-free is refused before it
/// starts (exit 74, not 75, nothing written); a partial download that no
/// run owns is removed by gc; doctor shows free space and partial bytes.
#[test]
fn disk_space_is_checked_and_partials_are_collected() {
    let srv = S3Server::shared();
    let big = tar_layer(93, 20 << 20);
    srv.put("priv", "space/images/big/1.tar", &big);
    let t = Thinimg::new(srv, "priv", "space/images/");
    let r = t.run(&["fetch", "--min-free", "1000T", "big"], &[]);
    assert_eq!(r.code, 74, "{}", r.stderr);
    assert!(r.stderr.contains("not enough free space") && r.stderr.contains("--min-free"), "{}", r.stderr);
    assert!(t.blob_files().is_empty());
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0);
    // The reserve is also a config/env setting, read by doctor.
    let j = t.run(&["doctor", "--json"], &[("THINIMG_MIN_FREE", "1000T")]).json();
    let c = j["checks"].as_array().unwrap().iter().find(|c| c["name"] == "state filesystem").unwrap().clone();
    assert_eq!(c["status"], "warn", "{j:#}");
    // Killed mid-download: a partial stays for a resume...
    let r = t.run(&["fetch", "big"], &[("THINIMG_FAULT", "download:chunk")]);
    assert_eq!(r.code, -1, "{}", r.stderr);
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 1);
    let j = t.run(&["doctor", "--json"], &[]).json();
    let c = j["checks"].as_array().unwrap().iter().find(|c| c["name"] == "state filesystem").unwrap().clone();
    assert!(c["detail"].as_str().unwrap().contains("1 partial download(s) (1"), "{c:#}");
    // ...until gc, which no unfinished run stops.
    let j = t.ok(&["gc", "--json"]).json();
    assert!(j["stray_files"].to_string().contains("1 partial download(s)"), "{j:#}");
    assert_eq!(common::file_count(&t.state.join("blobs/partial")), 0);
    let j = t.ok(&["fetch", "--json", "big"]).json();
    assert_eq!(j["images"][0]["layers"][0]["resumed_from"], 0);
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&big));
}

/// A server that trickles an object (a byte at a time, each read within
/// the per-read timeout) cannot hold a download, and so the state lock:
/// the whole download has a budget, and the bytes received are kept.
/// A server listing one object, images/slow/1.tar, with `data`, whose GETs
/// (ranged or not) send it 700 bytes at a time, `pause` apart.
fn trickle_server(data: Vec<u8>, pause: Duration) -> ScriptedServer {
    let etag = common::md5_hex(&data);
    ScriptedServer::start(move |head, conn| {
        if head.contains("list-type=2") {
            let x = format!(
                "<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>images/slow/1.tar</Key><ETag>\"{etag}\"</ETag><Size>{}</Size></Contents></ListBucketResult>",
                data.len()
            );
            reply(conn, "200 OK", x.as_bytes());
            return;
        }
        let start = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim_end_matches('-').to_string())
            })
            .and_then(|r| r.parse::<usize>().ok())
            .unwrap_or(0);
        let _ = write!(
            conn,
            "HTTP/1.1 {}\r\nETag: \"{etag}\"\r\nContent-Length: {}\r\n",
            if start > 0 { "206 Partial Content" } else { "200 OK" },
            data.len() - start
        );
        if start > 0 {
            let _ = write!(conn, "Content-Range: bytes {start}-{}/{}\r\n", data.len() - 1, data.len());
        }
        let _ = write!(conn, "Connection: close\r\n\r\n");
        for chunk in data[start..].chunks(700) {
            if conn.write_all(chunk).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    })
}

#[test]
fn a_trickled_download_is_abandoned_in_bounded_time() {
    let srv = trickle_server(tar_layer(95, 200_000), Duration::from_millis(300));
    let t = against(&srv.endpoint);
    let t0 = Instant::now();
    let r = t.run(&["fetch", "--timeout", "1", "--retries", "1", "slow"], &[]);
    let took = t0.elapsed();
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(took < Duration::from_secs(12), "took {took:?}: {}", r.stderr);
    assert!(r.stderr.contains("too slow") && r.stderr.contains(&srv.endpoint), "{}", r.stderr);
    assert!(t.blob_files().is_empty());
}

/// `images` shows an image's rejected layer with its reason (the image
/// rows are written here as a pull would; a pull needs device-mapper).
#[test]
fn images_show_a_rejected_layer_with_its_reason() {
    let data = tar_layer(96, 50_000);
    let s = common::TinyS3::start("bkt");
    s.put(
        "images/im/1.tar",
        common::Served {
            first: data.clone(),
            ranged: data.clone(),
            etag: common::md5_hex(&data),
            ..Default::default()
        },
    );
    let t = against(&s.server.endpoint);
    t.ok(&["fetch", "im"]);
    let digest = sha256_hex(&data);
    reject_in_db(&t, &digest, "rule owner-range: uid 4294967295");
    let c = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    c.execute(
        "INSERT INTO images (name, family, top_layer, state, updated_at) VALUES ('im', 'im', 1, 'pulling', 0)",
        [],
    )
    .unwrap();
    c.execute(
        "INSERT INTO image_layers (image, position, key, digest) VALUES ('im', 1, 'images/im/1.tar', ?1)",
        [&digest],
    )
    .unwrap();
    let j = t.ok(&["images", "--json"]).json();
    let r = &j["images"][0]["rejected_layers"][0];
    assert_eq!(r["reason"], "rule owner-range: uid 4294967295", "{j:#}");
    assert_eq!(r["position"], 1);
    let text = t.ok(&["images"]).stdout;
    assert!(text.contains("layer 1 rejected: rule owner-range"), "{text}");
}

/// A listing with empty ETags (a read-through cache that has not read the
/// object yet) identifies nothing: the key is not taken as cached, and
/// nothing is deduplicated by it.
#[test]
fn empty_listing_etags_are_never_trusted() {
    let v1 = tar_layer(97, 60_000);
    let v2 = tar_layer(98, 60_000);
    let s = common::TinyS3::start("bkt");
    let served =
        |d: &Vec<u8>| common::Served { first: d.clone(), ranged: d.clone(), etag: String::new(), ..Default::default() };
    s.put("images/e/1.tar", served(&v1));
    s.put("images/f/1.tar", served(&v1));
    let t = against(&s.server.endpoint);
    let j = t.ok(&["fetch", "--json", "e", "f"]).json();
    assert_eq!(j["downloaded"], 2, "no dedupe on an empty ETag: {j:#}");
    s.put("images/e/1.tar", served(&v2));
    let j = t.ok(&["fetch", "--json", "e"]).json();
    assert_eq!(j["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&v2), "{j:#}");
}

/// `--endpoint URL1,URL2`: an unreachable or failing endpoint passes the
/// request to the next (logged once); an auth error or a missing object
/// never falls through. Two real SeaweedFS servers: the second plays the
/// origin behind a cache that lacks the object.
#[test]
fn endpoint_fallback_skips_only_unreachable_or_failing_endpoints() {
    let srv = S3Server::shared();
    let data = tar_layer(99, 80_000);
    srv.put("priv", "fallback/images/fb/1.tar", &data);
    let with = |eps: &str| Thinimg { endpoint: eps.to_string(), ..Thinimg::new(srv, "priv", "fallback/images/") };
    // Unreachable first: the listing and the GET both go to the second,
    // and the switch is logged once.
    let r = with(&format!("http://127.0.0.1:1,{}", srv.endpoint)).run(&["fetch", "--json", "fb"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["images"][0]["layers"][0]["digest"].as_str().unwrap(), sha256_hex(&data));
    assert_eq!(r.stderr.matches("falling back to").count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("http://127.0.0.1:1"), "{}", r.stderr);
    // 5xx first: same.
    let failing = ScriptedServer::start(|_, conn| {
        reply(conn, "503 Service Unavailable", b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>")
    });
    let r = with(&format!("{},{}", failing.endpoint, srv.endpoint)).run(&["ls-remote", "--json"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["families"]["fb"]["layers"].as_array().unwrap().len(), 1);
    // An auth error is final: the next endpoint is never asked.
    let denied = ScriptedServer::start(|_, conn| {
        reply(conn, "403 Forbidden", b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>")
    });
    let counting = ScriptedServer::start(|_, conn| reply(conn, "500 Internal Server Error", b""));
    let r = with(&format!("{},{}", denied.endpoint, counting.endpoint)).run(&["ls-remote"], &[]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(!r.stderr.contains("falling back"), "{}", r.stderr);
    assert_eq!(counting.count(), 0);
    // A second real SeaweedFS that lacks the object (a cold cache that
    // does not read through): its answer stands, exit 66, no fallback.
    let other = S3Server::start();
    other.put("priv", "fallback/images/other/1.tar", &tar_layer(100, 1000));
    let r = with(&format!("{},{}", other.endpoint, srv.endpoint)).run(&["fetch", "fb"], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    assert!(!r.stderr.contains("falling back"), "{}", r.stderr);
    // The origin stops: the other endpoint serves what it has.
    let r = with(&format!("http://127.0.0.1:1,{}", other.endpoint)).run(&["fetch", "other"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `sync --jitter DURATION`: a random sleep below DURATION before the first
/// request; durations are checked at parse time.
#[test]
fn sync_jitter_sleeps_before_the_first_request() {
    let s = common::TinyS3::start("bkt");
    let t = against(&s.server.endpoint);
    let t0 = Instant::now();
    let r = t.run(&["sync", "--all", "-v", "--jitter", "2s"], &[]);
    let took = t0.elapsed();
    assert!(r.stderr.contains("--jitter 2 s"), "{}", r.stderr);
    let waited: f64 = r.stderr.split("waiting ").nth(1).and_then(|x| x.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited < 2.0, "{waited}");
    assert!(took.as_secs_f64() >= waited - 0.05, "{took:?} {waited}");
    let asked = s.server.count();
    for bad in ["5x", "25h", "-1", "1.5m"] {
        let r = t.run(&["sync", "--all", "--jitter", bad], &[]);
        assert_eq!(r.code, 64, "{bad}: {}", r.stderr);
        assert_eq!(s.server.count(), asked, "nothing asked before the usage error");
    }
}

/// A reader on a download's tap gets exactly the blob's bytes, from byte 0,
/// also when the download resumes a partial; when the object changed and
/// the download restarts, the reader is stopped, never fed the new bytes.
#[test]
fn a_tap_reads_a_download_as_it_arrives() {
    use std::io::Read;
    use thinimg::fetch::{
        blobstore::BlobStore,
        download::DownloadJob,
        tap::{Start, Tap, TapReader},
    };
    let srv = S3Server::shared();
    let data = tar_layer(71, 6 << 20);
    let key = "tap/images/t/1.tar";
    srv.put("priv", key, &data);
    let client = signed_client(srv, "tap/images/");
    let etag = client.stat(key).unwrap().etag;
    let state = common::tempdir("tap");
    let store = BlobStore::open(&state).unwrap();
    // A partial whose first MiB is durable, of this version.
    std::fs::write(state.join("blobs/partial/1.partial"), &data[..1 << 20]).unwrap();
    let stale = "0123456789abcdef0123456789abcdef";
    for (partial, resume, listed_etag) in
        [("1.partial", 1u64 << 20, etag.as_str()), ("2.partial", 0, etag.as_str()), ("3.partial", 0, stale)]
    {
        let tap = Tap::new(key, data.len() as u64);
        let job = DownloadJob {
            key,
            etag: listed_etag,
            size: data.len() as u64,
            partial,
            resume_offset: resume,
            max_size: 1 << 30,
            counter: None,
            tap: Some(&tap),
        };
        let (started_tx, started) = std::sync::mpsc::channel();
        let (got, d) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let start = tap.wait_start().unwrap();
                let _ = started_tx.send(());
                if matches!(start, Start::Ended) {
                    return Err(std::io::Error::other("the download ended before it was read"));
                }
                let mut got = Vec::new();
                let r = TapReader::open(&tap).unwrap().read_to_end(&mut got);
                r.map(|_| got)
            });
            let d = store.download(&client, &job, &mut |_| Ok(()));
            // (A restarted download never lets its reader start.)
            let _ = started.recv_timeout(std::time::Duration::from_secs(2));
            // The feed ends the tap once the blob is recorded.
            tap.finish(match &d {
                Ok(d) => Ok(d.digest.clone()),
                Err(e) => Err((e.kind(), e.full_message())),
            });
            (reader.join().unwrap(), d.unwrap())
        });
        assert_eq!(d.digest.as_str(), sha256_hex(&data), "{partial}");
        if listed_etag == stale {
            // Stopped whether it was already reading or not yet.
            got.expect_err("a restarted download stops its reader");
            assert!(tap.restarted());
        } else {
            let got = got.unwrap_or_else(|e| panic!("{partial}: {e}"));
            assert_eq!(got.len(), data.len(), "{partial}");
            assert!(got == data, "{partial}: the reader got other bytes than the blob");
        }
    }
    std::fs::remove_dir_all(&state).ok();
}

/// Bytes of `path` resident in the page cache (util-linux `fincore`).
fn cached_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) is required");
    assert!(out.status.success(), "fincore {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("fincore prints a byte count")
}

/// A blob is written once and read once, by its chain's build: it goes to
/// disk past the page cache (ops::direct), not through a blob's worth of
/// zeroed, copied cache pages left behind, both when it downloads in one go
/// and when it resumes (the durable prefix is re-read the same way). Only
/// the tail that is not a whole 4 KiB block goes through the cache.
#[test]
fn a_downloaded_blob_leaves_no_page_cache_behind() {
    let srv = S3Server::shared();
    let big = tar_layer(31, (24 << 20) + 1234);
    srv.put("priv", "direct/images/big/1.tar", &big);
    let t = Thinimg::new(srv, "priv", "direct/images/");
    // The state dir must be on a filesystem with direct I/O (not a tmpfs):
    // fail here, naming it, rather than measure the wrong thing.
    let probe = t.state.parent().expect("the state dir's parent").join("direct-probe");
    std::fs::write(&probe, b"x").unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&probe).unwrap_or_else(|e| {
            panic!("{} has no O_DIRECT ({e}): run the tests with TMPDIR on a disk filesystem", probe.display())
        });
    }
    std::fs::remove_file(&probe).unwrap();
    let j = t.ok(&["fetch", "--json", "big"]).json();
    assert_eq!(j["downloaded"], 1, "{j:#}");
    let blob = t.state.join("blobs/sha256").join(sha256_hex(&big));
    let cached = cached_bytes(&blob);
    assert!(cached <= 64 << 10, "{cached} bytes of a {} byte blob are in the page cache", big.len());
    assert!(std::fs::read(&blob).unwrap() == big, "the blob's bytes differ");

    // Killed after the first checkpoint, then resumed.
    let t = Thinimg::new(srv, "priv", "direct/images/");
    let r = t.run(&["fetch", "--json", "big"], &[("THINIMG_FAULT", "download:chunk")]);
    assert_eq!(r.code, -1, "expected SIGKILL: {}", r.stderr);
    let j = t.ok(&["fetch", "--json", "big"]).json();
    assert!(j["images"][0]["layers"][0]["resumed_from"].as_u64().unwrap() > 0, "{j:#}");
    let blob = t.state.join("blobs/sha256").join(sha256_hex(&big));
    let cached = cached_bytes(&blob);
    assert!(cached <= 64 << 10, "resumed: {cached} bytes of a {} byte blob are in the page cache", big.len());
    assert!(std::fs::read(&blob).unwrap() == big, "resumed: the blob's bytes differ");
}

/// SIGINT reaches a download whose server trickles at once, not when a
/// 256 KiB buffer is full (downloads fill whole buffers, for direct I/O):
/// the bytes received so far are kept and the command exits 130.
#[test]
fn sigint_stops_a_trickled_download_at_once() {
    let srv = trickle_server(tar_layer(96, 200_000), Duration::from_millis(100));
    let t = against(&srv.endpoint);
    let mut child =
        t.command(&["fetch", "--timeout", "60", "slow"], &[]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(child.try_wait().unwrap().is_none(), "fetch ended before it could be interrupted");
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // The body would take 28 s; a full buffer never comes.
    assert!(took < Duration::from_secs(5), "SIGINT took {took:?} to stop the download: {stderr}");
    assert!(stderr.contains("stopped at byte"), "{stderr}");
}
