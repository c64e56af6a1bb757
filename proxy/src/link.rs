//! The link to the control plane: the watch stream that brings policies, the trust bundle,
//! the endpoint registry and (in Kubernetes) the service table, and the acks that report
//! what this proxy enforces.
//!
//! Each update is compiled into a new snapshot and swapped in whole; connections the new
//! policy no longer allows are closed. When the control plane goes away nothing changes in
//! flight: the last snapshot stays in force and the link reconnects with backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use trellis_control::api::WatchEvent;
use trellis_control::{ClientError, ControlClient};
use trellis_identity::TrustBundle;
use trellis_policy::{Action, Defaults, Policy, PolicySnapshot};

use crate::state::{PolicyView, ProxyState, Registry, TlsState};
use crate::svid::Backoff;

/// What the stream has said so far (later events only carry what changed).
#[derive(Default)]
struct Received {
    policies: Vec<Policy>,
}

pub async fn watch_loop(state: Arc<ProxyState>, client: ControlClient) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        if state.shutdown.is_cancelled() {
            return;
        }
        let result = tokio::select! {
            r = follow(&state, &client, &mut backoff) => r,
            () = state.shutdown.cancelled() => return,
        };
        let error = match result {
            Ok(()) => "stream ended".to_string(),
            Err(e) => e.to_string(),
        };
        if state.policy.load().applied {
            tracing::warn!(%error, "lost the control plane; enforcing the last policy and reconnecting");
        } else {
            // Nothing to enforce yet: every flow stays denied until a first policy arrives.
            tracing::warn!(%error, "lost the control plane before any policy arrived; failing closed (denying everything) and reconnecting");
        }
        state.update_control(|c| {
            c.connected = false;
            c.session = None;
            c.last_error = Some(error);
            c.reconnects += 1;
        });
        tokio::select! {
            () = backoff.wait() => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Follows one watch stream until it fails.
async fn follow(state: &Arc<ProxyState>, client: &ControlClient, backoff: &mut Backoff) -> Result<(), ClientError> {
    let mut stream = client.watch().await?;
    let mut received = Received::default();
    loop {
        let event = stream.next().await?;
        backoff.reset(Duration::from_millis(200));
        let session = event.session;
        let version = event.version;
        match apply(state, event, &mut received) {
            Ok(applied) => {
                if applied == Applied::Policy {
                    // The old snapshot and the event's parse are freed by now; without a trim
                    // glibc keeps that peak for good (a 60 k-rule policy applied, then
                    // deleted: 122 MiB resident). Policy changes are rare and the walk of a
                    // sidecar's small heap is short.
                    drop(tokio::task::spawn_blocking(crate::trim::release_free_memory));
                }
                let mut was_lost = false;
                state.update_control(|c| {
                    // After a loss the operator saw warnings; say when it is over.
                    was_lost = !c.connected && c.reconnects > 0;
                    c.connected = true;
                    c.session = Some(session);
                    c.last_error = None;
                });
                if was_lost {
                    tracing::info!(policy_version = version, "reconnected to the control plane");
                }
                let (state, client) = (state.clone(), client.clone());
                tokio::spawn(async move {
                    match client.ack(session, version).await {
                        // Acks race each other: keep the highest, as the control plane does.
                        Ok(()) => state.update_control(|c| c.acked_version = c.acked_version.max(Some(version))),
                        Err(e) => tracing::debug!(error = %e, "ack failed"),
                    }
                });
            }
            Err(e) => {
                // Keep enforcing the last good snapshot; a bad push must not open anything.
                tracing::error!(error = %e, version, "could not apply the control plane's update");
                state.update_control(|c| c.last_error = Some(e.clone()));
            }
        }
    }
}

/// Whether an event changed the policy in force (then the old one is garbage).
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Policy,
    Other,
}

fn apply(state: &ProxyState, event: WatchEvent, received: &mut Received) -> Result<Applied, String> {
    if let Some(pem) = event.bundle_pem {
        let bundle = TrustBundle::from_pem(pem.as_bytes()).map_err(|e| format!("trust bundle: {e}"))?;
        let current = state.tls.load();
        if current.as_ref().is_none_or(|t| t.bundle != bundle) {
            let td = state.id().map(|id| id.trust_domain()).ok_or("no SVID yet")?;
            let tls = TlsState::new(bundle, td, state.creds.clone()).map_err(|e| e.to_string())?;
            state.tls.store(Some(Arc::new(tls)));
            state.pools.clear();
            tracing::info!("trust bundle updated");
        }
    }
    // The registry and the service table arrive separately but make one snapshot: an event
    // bringing either swaps it whole, carrying the other over.
    let endpoints = (event.endpoints_version.zip(event.endpoints))
        .map(|(version, e)| Registry::new(version, e.into_iter().map(|e| (e.address, e.spiffe_id))));
    let services = (event.services_version.zip(event.services)).map(|(version, s)| {
        (version, Registry::parse_services(s.iter().map(|s| (s.address.as_str(), s.endpoints.as_slice()))))
    });
    if endpoints.is_some() || services.is_some() {
        let registry = state.registry.load().updated(endpoints, services);
        tracing::debug!(
            version = registry.version,
            services_version = registry.services_version,
            entries = registry.len(),
            services = registry.services_len(),
            "endpoint registry updated"
        );
        state.registry.store(Arc::new(registry));
    }
    if let Some(policies) = event.policies {
        received.policies = policies;
    }
    let current = state.policy.load();
    if current.applied && current.snapshot.version() == event.version {
        return Ok(Applied::Other);
    }
    let defaults = Defaults { mesh: state.config.default_action, egress: Action::Deny };
    let snapshot = PolicySnapshot::compile(event.version, received.policies.clone(), defaults)
        .map_err(|e| format!("policy: {e}"))?;
    let closed = state.conns.recheck(&snapshot);
    state.policy.store(Arc::new(PolicyView { snapshot, applied: true }));
    state.first_policy.cancel();
    // Recheck again against the stored snapshot: a connection admitted between the first
    // recheck and the swap was judged by the old policy. One registered after this recheck
    // but decided before the swap judges itself again (`ProxyState::track`).
    let closed = closed + state.conns.recheck(&state.policy.load().snapshot);
    state.metrics.policy_version.set(event.version as i64);
    state.metrics.connections_revoked.inc_by(closed as u64);
    tracing::info!(version = event.version, policies = received.policies.len(), revoked = closed, "policy applied");
    Ok(Applied::Policy)
}
