//! Identity micro-benchmarks: SVIDs signed per second (CSR check + ECDSA P-256 signature)
//! and full mutual-TLS 1.3 handshakes per second (both sides, in memory, SPIFFE verifiers
//! included). Run with `cargo bench --bench identity`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trellis_identity::pki_types::ServerName;
use trellis_identity::rustls::{ClientConnection, ServerConnection};
use trellis_identity::{
    CertificateAuthority, ClientAuth, CredentialStore, SpiffeId, TrustBundle, TrustDomain, WorkloadKey, client_config,
    server_config,
};

fn setup() -> (CertificateAuthority, TrustBundle, TrustDomain) {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let ca = CertificateAuthority::create_root(&td, Duration::from_secs(86400)).unwrap();
    let bundle = TrustBundle::new(vec![ca.root().clone()]).unwrap();
    (ca, bundle, td)
}

fn store(ca: &CertificateAuthority, id: &SpiffeId) -> Arc<CredentialStore> {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign_csr(&key.csr(id).unwrap(), id, Duration::from_secs(3600)).unwrap();
    CredentialStore::with(key.into_svid(issued.chain).unwrap()).unwrap()
}

fn bench_sign(c: &mut Criterion) {
    let (ca, _, td) = setup();
    let id = SpiffeId::workload(&td, "shop", "web").unwrap();
    let csr = WorkloadKey::generate().unwrap().csr(&id).unwrap();
    let mut g = c.benchmark_group("svid");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign_csr", |b| b.iter(|| ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap()));
    g.bench_function("generate_key_and_csr", |b| b.iter(|| WorkloadKey::generate().unwrap().csr(&id).unwrap()));
    g.finish();
}

/// Moves TLS records between the two in-memory ends until neither has anything to say.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut buf = Vec::with_capacity(8192);
    loop {
        let mut moved = false;
        while client.wants_write() {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            moved = true;
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

fn bench_handshake(c: &mut Criterion) {
    let (ca, bundle, td) = setup();
    let web = SpiffeId::workload(&td, "shop", "web").unwrap();
    let api = SpiffeId::workload(&td, "shop", "api").unwrap();
    let server_cfg =
        Arc::new(server_config(store(&ca, &api), &bundle, std::slice::from_ref(&td), ClientAuth::Required).unwrap());
    let mut client_cfg = client_config(Some(store(&ca, &web)), &bundle, api.clone()).unwrap();
    // Full handshakes only: resumption is measured separately below.
    client_cfg.resumption = trellis_identity::rustls::client::Resumption::disabled();
    let client_cfg = Arc::new(client_cfg);
    let name = ServerName::try_from("127.0.0.1").unwrap();

    let mut g = c.benchmark_group("mtls");
    g.throughput(Throughput::Elements(1));
    g.bench_function("full_handshake_both_sides", |b| {
        b.iter(|| {
            let mut client = ClientConnection::new(client_cfg.clone(), name.clone()).unwrap();
            let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
            pump(&mut client, &mut server);
            assert!(!client.is_handshaking() && !server.is_handshaking());
            trellis_identity::peer_spiffe_id(&server).unwrap()
        })
    });
    let resuming = Arc::new(client_config(Some(store(&ca, &web)), &bundle, api.clone()).unwrap());
    g.bench_function("resumed_handshake_both_sides", |b| {
        b.iter(|| {
            let mut client = ClientConnection::new(resuming.clone(), name.clone()).unwrap();
            let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
            pump(&mut client, &mut server);
            // Drain the server's tickets so the next iteration can resume.
            let mut sink = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut sink).unwrap();
            }
            client.read_tls(&mut sink.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_sign, bench_handshake);
criterion_main!(benches);
