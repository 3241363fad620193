//! Rebuild the BPF object when bpf-linker changes (it does the code generation).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker against \
         the nightly toolchain's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
