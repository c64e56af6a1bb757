//! A control plane on 127.0.0.1:0 in a temporary data dir, and clients for it.
#![allow(dead_code)]

pub mod fake_kube;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use trellis_control::ClientError;
use trellis_control::api::{BootstrapRequest, TokenRequest};
use trellis_control::server::Hooks;
use trellis_control::{ControlClient, ControlConfig, Running};
use trellis_identity::{CertificateAuthority, CredentialStore, SpiffeId, Svid, TrustBundle, TrustDomain, WorkloadKey};

pub struct Plane {
    pub running: Running,
    pub dir: tempfile::TempDir,
}

/// A claim no earlier holder blocks (every entry counts as stale), for tests that set the
/// registry up directly.
pub const FROM_ITSELF: trellis_control::store::Claim = trellis_control::store::Claim {
    from: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    fresh_after: u64::MAX,
    leave_out_held: false,
};

pub fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn config(dir: &std::path::Path) -> ControlConfig {
    ControlConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        trust_domain: td(),
        svid_ttl: Duration::from_secs(3600),
        ca_files: None,
        serving_names: vec![],
        header_timeout: Duration::from_secs(10),
    }
}

impl Plane {
    pub async fn start() -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let running = trellis_control::start(config(dir.path()), Hooks::default()).await.unwrap();
        Plane { running, dir }
    }

    /// Starts again on the same data dir (a restart).
    pub async fn restart(self) -> Plane {
        let Plane { running, dir } = self;
        running.shutdown().await;
        let running = trellis_control::start(config(dir.path()), Hooks::default()).await.unwrap();
        Plane { running, dir }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::load(&self.running.bundle_path).unwrap()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(&self.running.admin_token_path).unwrap().trim().to_string()
    }

    pub fn admin(&self) -> ControlClient {
        self.client_with(None, Some(self.admin_token()))
    }

    pub fn anonymous(&self) -> ControlClient {
        self.client_with(None, None)
    }

    pub fn client_with(&self, creds: Option<Arc<CredentialStore>>, token: Option<String>) -> ControlClient {
        ControlClient::new(&self.running.url, &self.bundle(), None, creds, token).unwrap()
    }

    /// The CA from the data dir, as an attacker with the disk (or a test) would load it.
    pub fn ca(&self) -> CertificateAuthority {
        CertificateAuthority::load(&td(), &self.dir.path().join("ca.pem"), &self.dir.path().join("ca-key.pem")).unwrap()
    }

    /// An SVID signed directly by the CA, valid from `now` for `ttl`.
    pub fn svid_at(&self, who: &str, ttl: Duration, now: SystemTime) -> Svid {
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr(&id(who)).unwrap();
        let issued = self.ca().sign_csr_at(&csr, &id(who), ttl, now).unwrap();
        key.into_svid(issued.chain).unwrap()
    }

    /// A workload client holding a fresh SVID for `who`.
    pub fn workload(&self, who: &str) -> ControlClient {
        let creds = CredentialStore::with(self.svid_at(who, Duration::from_secs(3600), SystemTime::now())).unwrap();
        self.client_with(Some(creds), None)
    }

    pub async fn token(&self, who: &str) -> String {
        self.admin().create_token(&TokenRequest { spiffe_id: id(who), ttl_seconds: None }).await.unwrap().token
    }
}

/// A bootstrap request for `who` with a fresh key; returns the key too.
pub fn bootstrap_request(token: &str, who: &str) -> (WorkloadKey, BootstrapRequest) {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id(who)).unwrap();
    let req = BootstrapRequest {
        token: Some(token.to_string()),
        k8s_token: None,
        csr_pem: trellis_identity::pem::csr_to_pem(&csr),
        addresses: vec![],
    };
    (key, req)
}

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// api-from-web: web may call api on port 8080.
pub const POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
spec:
  selector: spiffe://cluster.local/ns/shop/sa/api
  action: ALLOW
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/shop/sa/web
      to:
        - ports: [8080]
"#;

/// The status and message of an API error (panics on anything else).
pub fn api_error(r: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, String) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.error),
        other => panic!("expected an API error, got {other:?}"),
    }
}
