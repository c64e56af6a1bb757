//! Authorization: a pure function from (policy view, flow) to a [`Permit`] or a [`Denial`].
//!
//! A `Permit` can only be made here, and the forwarding stages take one by value, so no
//! code path can forward a flow that was not authorized. Before the control plane has sent
//! any policy, everything is denied with its own reason (fail closed).

use std::borrow::Cow;

use trellis_policy::{Decision, EgressFlow, Flow};

use crate::state::PolicyView;
use crate::telemetry::Verdict;

/// Proof that a flow was allowed, carrying the decision for telemetry.
#[derive(Debug)]
pub struct Permit {
    decision: Decision,
    version: u64,
}

impl Permit {
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The policy version that allowed the flow.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The decision, for telemetry.
    pub fn verdict(&self) -> Verdict {
        Verdict::Local { decision: self.decision.clone(), version: self.version }
    }
}

/// Why a flow was refused.
#[derive(Debug, Clone)]
pub enum Denial {
    /// The policy decided so.
    Policy { decision: Decision, version: u64 },
    /// No policy has arrived from the control plane yet.
    NoPolicyYet,
}

impl Denial {
    /// The value of the `x-trellis-denied` header.
    pub fn header_value(&self) -> Cow<'static, str> {
        match self {
            Denial::Policy { decision, .. } => decision.reason.header_value(),
            Denial::NoPolicyYet => Cow::Borrowed("no-policy-yet"),
        }
    }

    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Denial::Policy { decision, .. } => Some(decision),
            Denial::NoPolicyYet => None,
        }
    }

    /// The denial, for telemetry.
    pub fn verdict(&self) -> Verdict {
        match self {
            Denial::Policy { decision, version } => Verdict::Local { decision: decision.clone(), version: *version },
            Denial::NoPolicyYet => Verdict::NoPolicy,
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Policy { decision, .. } => decision.fmt(f),
            Denial::NoPolicyYet => f.write_str("deny: no policy received from the control plane yet (fail closed)"),
        }
    }
}

/// Decides a flow into a mesh workload.
pub fn authorize(view: &PolicyView, flow: &Flow<'_>) -> Result<Permit, Denial> {
    if !view.applied {
        return Err(Denial::NoPolicyYet);
    }
    let decision = view.snapshot.evaluate(flow);
    let version = view.snapshot.version();
    if decision.is_allowed() { Ok(Permit { decision, version }) } else { Err(Denial::Policy { decision, version }) }
}

/// Decides a connection out of the mesh.
pub fn authorize_egress(view: &PolicyView, flow: &EgressFlow<'_>) -> Result<Permit, Denial> {
    if !view.applied {
        return Err(Denial::NoPolicyYet);
    }
    let decision = view.snapshot.evaluate_egress(flow);
    let version = view.snapshot.version();
    if decision.is_allowed() { Ok(Permit { decision, version }) } else { Err(Denial::Policy { decision, version }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::SpiffeId;
    use trellis_policy::{Action, Defaults, PolicySnapshot, parse_documents};

    fn view(yaml: &str, applied: bool) -> PolicyView {
        let docs = parse_documents(yaml).unwrap();
        PolicyView { snapshot: PolicySnapshot::compile(3, docs, Defaults::default()).unwrap(), applied }
    }

    const ALLOW_WEB: &str = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: spiffe://td/ns/a/sa/api\n  rules:\n    - from: [{identity: spiffe://td/ns/a/sa/web}]\n";

    #[test]
    fn permits_and_denials() {
        let api = SpiffeId::parse("spiffe://td/ns/a/sa/api").unwrap();
        let web = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let flow =
            |src| Flow { source: Some(src), source_ip: [10, 0, 0, 1].into(), destination: &api, port: 80, http: None };
        let v = view(ALLOW_WEB, true);
        let permit = authorize(&v, &flow(&web)).unwrap();
        assert_eq!((permit.version(), permit.decision().action), (3, Action::Allow));
        let denial = authorize(&v, &flow(&api)).unwrap_err();
        assert_eq!(denial.header_value(), "default-deny");
        let not_yet = authorize(&view(ALLOW_WEB, false), &flow(&web)).unwrap_err();
        assert!(matches!(not_yet, Denial::NoPolicyYet));
        assert_eq!(not_yet.header_value(), "no-policy-yet");
    }
}
