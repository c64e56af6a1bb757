//! Build script of the `trellis` binary: lays out its code so that a sidecar maps only the
//! code it runs (`link/cold-code.ld` says why; `tests/layout.rs` checks it took effect).
//! Linux only: the fragment is an ELF linker script, and the reasoning is Linux's page
//! mapping.

fn main() {
    println!("cargo:rerun-if-changed=link/cold-code.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        // Two arguments, not `-Wl,-T,PATH`: `-Wl` would split a path that has a comma in it.
        println!("cargo:rustc-link-arg-bin=trellis=-T");
        println!("cargo:rustc-link-arg-bin=trellis={dir}/link/cold-code.ld");
    }
}
