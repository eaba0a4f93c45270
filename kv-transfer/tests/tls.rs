//! The TCP backend over TLS: a writer that trusts the sink's CA writes (and is fenced) as over
//! plain TCP; one trusting another CA, one without TLS, and a plain-text peer that knows the
//! secret all fail before a byte lands.

mod common;

use std::path::{Path, PathBuf};

use common::{pattern_block, small_layout, snapshot, LOOPBACK};
use kv_transfer::{connect, connect_with, tls, BackendChoice, KvSink, TransferBackend};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

fn temp_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kv-tls-{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sink_takes_writes_only_from_writers_that_trust_its_ca() {
    let (ca, cert, key) = certificates(&temp_dir("ours"));
    let (other_ca, _, _) = certificates(&temp_dir("theirs"));
    let layout = small_layout();
    let server = tls::server_config(&cert, &key).unwrap();
    let sink = KvSink::with_tls(
        layout.clone(),
        &[TransferBackend::Tcp],
        LOOPBACK,
        Some(server),
    )
    .await
    .unwrap();
    let desc = sink.descriptor();
    assert!(desc.tls);
    let only_tcp = BackendChoice::Only(TransferBackend::Tcp);
    let generation = sink.fences().grant(&[3]).unwrap();
    let block = pattern_block(&layout, 4);

    // No TLS on the writer's side: refused before dialling.
    let err = connect(&desc, &layout, only_tcp).await.err().unwrap();
    assert!(err.to_string().contains("--kv-tls-ca"), "{err}");
    // Another CA: the handshake fails.
    let wrong = tls::client_config(&other_ca).unwrap();
    let err = connect_with(&desc, &layout, only_tcp, Some(wrong))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    // A plain-text peer with the secret: the server wants a handshake and reads nothing else.
    let secret = serde_json::to_value(&desc).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut raw = tokio::net::TcpStream::connect(&desc.endpoints[0].address)
        .await
        .unwrap();
    let mut frame = b"BKVH".to_vec();
    frame.extend_from_slice(secret.as_bytes());
    let _ = raw.write_all(&frame).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        raw.read_to_end(&mut reply),
    )
    .await;
    assert!(!reply.starts_with(&[3]), "a plain-text peer was let in");
    assert!(snapshot(&sink).iter().all(|&b| b == 0), "nothing landed");

    // The right CA: writes land, and the fence holds as over plain TCP.
    let ours = tls::client_config(&ca).unwrap();
    let writer = connect_with(&desc, &layout, only_tcp, Some(ours.clone()))
        .await
        .unwrap();
    writer
        .write_blocks(generation, &[3], std::slice::from_ref(&block))
        .await
        .unwrap();
    let start = layout.offset(1, 3);
    let chunk = layout.layer_block_bytes();
    assert!(snapshot(&sink)[start..start + chunk] == block[chunk..2 * chunk]);
    let fenced = writer
        .write_blocks(generation, &[4], std::slice::from_ref(&block))
        .await;
    assert!(
        matches!(
            fenced,
            Err(kv_transfer::TransferError::Fenced { block: 4, .. })
        ),
        "{fenced:?}"
    );
    // A plain sink refuses a writer set up for TLS (it must not send in clear).
    let plain = KvSink::new(layout.clone(), &[TransferBackend::Tcp], LOOPBACK)
        .await
        .unwrap();
    let err = connect_with(&plain.descriptor(), &layout, only_tcp, Some(ours))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("plain TCP"), "{err}");
}

#[test]
fn unreadable_or_mismatched_tls_files_are_named() {
    let dir = temp_dir("bad");
    let (ca, cert, _) = certificates(&dir);
    let (_, _, other_key) = certificates(&temp_dir("bad-other"));
    let missing = dir.join("missing.pem");
    let err = tls::server_config(&missing, &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    let err = tls::server_config(&cert, &other_key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cert.pem"), "{err}");
    let err = tls::client_config(&dir.join("nothing.pem"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing.pem"), "{err}");
    tls::client_config(&ca).unwrap();
}
