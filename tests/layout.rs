//! The `trellis` binary's code layout (`link/cold-code.ld`, passed by `build.rs`): the code a
//! sidecar never runs sits in its own section after `.text`, so a proxy maps only the pages it
//! uses (idle RSS, benches/RESULTS.md). A linker that ignored the script, or section names
//! that stopped matching its patterns (a change of symbol mangling), would silently cost every
//! sidecar ~0.8 MiB; this test says so instead. Reads the ELF section headers itself.

#![cfg(target_os = "linux")]

/// The names and sizes of an ELF64 little-endian file's sections.
fn sections(elf: &[u8]) -> Vec<(String, u64)> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not ELF64 little-endian");
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18) as usize;
    (0..shnum)
        .map(|i| {
            let name_at = strtab + u32_at(header(i));
            let len = elf[name_at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&elf[name_at..name_at + len]).into_owned();
            (name, u64_at(header(i) + 0x20))
        })
        .collect()
}

#[test]
fn code_a_sidecar_never_runs_is_laid_out_apart() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_trellis")).unwrap();
    let sections = sections(&elf);
    let size = |name: &str| sections.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
    let text = size(".text").expect("a .text section");
    let cold = size(".text.trellis_cold").unwrap_or_else(|| panic!("no .text.trellis_cold: {sections:?}"));
    // The control plane's store, the YAML parser and the CLI's commands alone are hundreds of
    // KiB in any profile; a few KiB would mean the patterns no longer match.
    assert!(cold > 256 * 1024, ".text.trellis_cold holds only {cold} bytes (.text {text})");
    assert!(cold < text, "most code is the proxy's: cold {cold}, .text {text}");
}
