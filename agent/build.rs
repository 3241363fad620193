//! Builds the BPF object (crate `ripcord-agent-ebpf`) with the nightly toolchain and
//! bpf-linker, into `$OUT_DIR/ripcord-agent-ebpf`; `src/bpf.rs` embeds it.
//! Run `cargo xtask setup` once on a new machine (nightly rust-src, bpf-linker).
//!
//! This follows `aya_build::build_ebpf`, with one difference: it passes
//! `-C target-cpu=v3`. aya-build 0.2 fixes the rustflags, which leaves the CPU at `generic`
//! (v1), where LLVM cannot use the value an atomic fetch-and-add returns; the per-device
//! sequence numbers need it. See docs/decisions/0002-bpf-build.md.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const PACKAGE: &str = "ripcord-agent-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let common_dir = manifest_dir.join("../agent-common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=RIPCORD_BPF_CPU");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");
    // The kernels we support have BPF v3 (atomics with fetch, jmp32: Linux >= 5.12).
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let cpu = env::var("RIPCORD_BPF_CPU").unwrap_or_else(|_| "v3".to_owned());
    let rustflags = [
        &format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        &format!("-Ctarget-cpu={cpu}"),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
    ])
    .args(["--release", "--target", TARGET, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer cargo's settings would pin the stable toolchain and its flags.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    let output = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the BPF programs failed ({}); `cargo xtask setup` installs what they \
             need (nightly rust-src, bpf-linker)",
            output.status
        );
    }
    let built = target_dir.join(TARGET).join("release").join(PACKAGE);
    let dst = out_dir.join(PACKAGE);
    std::fs::copy(&built, &dst)
        .with_context(|| format!("copying {} to {}", built.display(), dst.display()))?;
    Ok(())
}
