//! `trellis-control`: the control plane (`trellis control run`); docs/architecture.md (control).
//!
//! - [`run`] prepares the data dir (CA, `bundle.pem`, `admin.token`, the store) and serves;
//! - [`server`] is the HTTPS API: SVID bootstrap and renewal, the watch stream, the admin
//!   routes (tokens, policies, checks, workloads, audit log) and the injection webhook;
//! - [`store`] is the durable, versioned redb store; [`state`] the in-memory snapshots and
//!   the change hub that wakes watchers; [`tokens`] join/admin token handling;
//! - [`workload_id`] says which SPIFFE IDs may be issued to workloads (never the control
//!   plane's own `/trellis/...`, never a trust domain without a path);
//! - [`api`] holds the wire types and [`client`] the client proxies and the CLI use;
//! - [`inject`], [`kube`] and [`services`] are the Kubernetes pieces (sidecar injection,
//!   TokenReview, the Service table pushed to proxies).
//!
//! The API is described in `docs/api/openapi.yaml`.

pub mod api;
pub mod client;
pub mod hooks;
pub mod inject;
pub mod kube;
mod mesh_ca;
pub mod run;
pub mod server;
pub mod services;
pub mod state;
pub mod store;
pub mod tokens;
pub mod workload_id;

pub use client::{ClientError, ControlClient, WatchStream};
pub use run::{ControlConfig, Running, StartError, start};
