//! `trellis-control`: the control plane (`trellis control run`).
//!
//! Not built yet. It will hold the CA service (SVID bootstrap with join tokens, renewal with
//! the current SVID), the durable versioned policy store, the endpoint registry, the watch
//! stream that pushes each proxy its policies and trust bundle, and the admin API, as described
//! in DESIGN.md §6.
