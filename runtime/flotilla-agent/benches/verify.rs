//! The agent-side cost of a signed release: verifying a 100 MB artifact's
//! minisign signature (BLAKE2b-512 over the bytes, then Ed25519) beside
//! the sha256 digest check every download already gets. Both run the
//! agent's own functions over the same file in the page cache; several
//! iterations, medians printed.
//!
//! `cargo bench -p flotilla-agent --bench verify` (`-- --mb 20 --iters 3`
//! for a quicker run).

use flotilla_agent::upgrade::sha256_file;
use flotilla_agent::verify::TrustedKeys;
use flotilla_model::protocol::Artifact;
use flotilla_model::signing::trusted_comment;
use std::io::Write as _;
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mb = arg("--mb", 100);
    let iters = arg("--iters", 7).max(1);
    let size = mb * 1_000_000;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("artifact");
    // Incompressible bytes, written once.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.into_inner().unwrap().sync_all().unwrap();

    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let sha = sha256_file(&path).unwrap();
    let comment = trusted_comment("bench", "1.0.0", &sha, size as u64);
    let sig = minisign::sign(
        Some(&kp.pk),
        &kp.sk,
        std::fs::File::open(&path).unwrap(),
        Some(&comment),
        None,
    )
    .unwrap()
    .into_string();
    let keys = TrustedKeys::load(&[kp.pk.to_base64()]).unwrap();
    let artifact = Artifact {
        url: "/bench".into(),
        sha256: sha.clone(),
        size: size as u64,
        kind: Default::default(),
        signature: Some(sig),
    };

    let (mut digest, mut signed) = (Vec::new(), Vec::new());
    // One warm-up of each, then interleaved runs.
    sha256_file(&path).unwrap();
    for i in 0..=iters {
        let t = Instant::now();
        assert_eq!(sha256_file(&path).unwrap(), sha);
        let d = t.elapsed();
        let t = Instant::now();
        let checked = keys.precheck("bench", "1.0.0", &artifact).unwrap().unwrap();
        keys.verify_file(&checked, &path).unwrap();
        let s = t.elapsed();
        if i > 0 {
            digest.push(d);
            signed.push(s);
        }
    }
    let (d, s) = (median(digest), median(signed));
    let rate = |t: Duration| size as f64 / 1e6 / t.as_secs_f64();
    println!("artifact: {mb} MB, {iters} iterations, medians");
    println!(
        "sha256 (every download)            {:>8.1} ms  {:>7.0} MB/s",
        d.as_secs_f64() * 1e3,
        rate(d)
    );
    println!(
        "minisign verify (trusted_keys set) {:>8.1} ms  {:>7.0} MB/s",
        s.as_secs_f64() * 1e3,
        rate(s)
    );
    println!(
        "a signed install costs sha256 + verify = {:.1} ms, {:.2}x the digest alone",
        (d + s).as_secs_f64() * 1e3,
        (d + s).as_secs_f64() / d.as_secs_f64()
    );
}
