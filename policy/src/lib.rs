//! `trellis-policy`: policy documents, validation, compiled evaluation and explain.
//!
//! Not built yet (issue #3): see DESIGN.md section 4.
