//! `trellis-proxy`: the sidecar data plane (`trellis proxy run`).
//!
//! Not built yet. It will hold the inbound listener (mTLS required, peer SPIFFE ID from the
//! certificate, L4 and per-request L7 policy, forward to the local app), the outbound listener
//! (plaintext from the app, mTLS to the peer sidecar requiring its expected SPIFFE ID, egress
//! policy), the admin listener (`/live`, `/ready`, `/metrics`, `/config`) and telemetry, as
//! described in DESIGN.md §5 and §7.
