//! `cargo xtask setup`: install everything the build and the tests need, idempotently.
//!
//! Each step checks first and does nothing when already satisfied, so running it before
//! every other task costs well under a second on a prepared machine.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, cmd_output};

/// The Garage release the S3 test runs against (`cargo install garage`). 2.5.0 builds with
/// stable Rust 1.95 and its default features (`--locked`).
const GARAGE_VERSION: &str = "2.5.0";

/// Debian packages the tests, demo and benchmarks use.
/// iproute2 and nftables: the network-namespace tests (`tests/tests/faults/netns.rs`);
/// openssh-server: the deploy test (`tests/tests/deploy.rs`, an sshd per simulated host);
/// chromium: the status page test renders the page in a real headless browser
/// (`tests/tests/status_page.rs`).
const APT_PACKAGES: &[&str] = &[
    "fio",
    "e2fsprogs",
    "xfsprogs",
    "util-linux",
    "fdisk",
    "iproute2",
    "nftables",
    "openssh-server",
    "chromium",
];

/// What a task needs beyond the BPF toolchain and the Debian packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Build, demo, benchmarks: the BPF toolchain and the Debian packages.
    Base,
    /// The whole test suite: also Garage (only the S3 test uses it; it builds from source
    /// in 10-30 minutes, so the demo does not wait for it).
    Everything,
    /// Nothing (deploy: its work happens on other hosts).
    Nothing,
}

pub fn run(needs: Needs) -> anyhow::Result<()> {
    if needs == Needs::Nothing {
        return Ok(());
    }
    announce(needs);
    toolchains()?;
    bpf_linker()?;
    apt_packages()?;
    if needs == Needs::Everything {
        garage()?;
    }
    Ok(())
}

/// Say up front what is missing and about how long installing it takes, before any of
/// it starts.
fn announce(needs: Needs) {
    let works = |bin: &str, arg: &str| {
        Command::new(bin)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut plan = Vec::new();
    let nightly = cmd_output("rustup", &["toolchain", "list"])
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("nightly")));
    if !nightly {
        plan.push("the nightly toolchain and rust-src (about 1 minute)");
    }
    if !works("bpf-linker", "--version") {
        plan.push("bpf-linker, built against the nightly compiler's LLVM (3-6 minutes)");
    }
    if !APT_PACKAGES.iter().all(|p| dpkg_installed(p)) {
        plan.push(
            "Debian packages: fio, e2fsprogs, xfsprogs, util-linux, fdisk, iproute2, nftables, \
             openssh-server, chromium (a minute or two)",
        );
    }
    if needs == Needs::Everything
        && which("garage").is_err()
        && !cargo_bin().join("garage").is_file()
    {
        plan.push("Garage, the S3 server of the S3 test, built from source (10-30 minutes)");
    }
    if !plan.is_empty() {
        say(&format!(
            "first run on this machine; installing: {}",
            plan.join("; ")
        ));
    }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn say(msg: &str) {
    eprintln!("xtask setup: {msg}");
}

/// Nightly with rust-src (the BPF build uses `-Z build-std=core`), and clippy + rustfmt on
/// the default toolchain (CI checks both).
fn toolchains() -> anyhow::Result<()> {
    let toolchains = cmd_output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (needed to build the BPF programs)");
        cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let nightly = cmd_output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )?;
    if !nightly.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to nightly");
        cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    let stable = cmd_output("rustup", &["component", "list", "--installed"])?;
    for c in ["clippy", "rustfmt"] {
        if !stable.lines().any(|l| l.starts_with(c)) {
            say(&format!("adding {c}"));
            cmd("rustup", &["component", "add", c])?;
        }
    }
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// bpf-linker built against the nightly compiler's own libLLVM (DESIGN.md section 8): a
/// prefix directory whose `lib/` holds `libLLVM.so` and the library's soname, both
/// symlinks to the file in the nightly sysroot. The LLVM major version comes from
/// `rustc +nightly -vV`. The prefix stays: the binary's rpath points at it.
fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(cmd_output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let version = cmd_output("rustc", &["+nightly", "-vV"])?;
    let major = llvm_major(&version).context("no `LLVM version` in `rustc +nightly -vV`")?;
    let lib = sysroot.join("lib");
    let soname = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = home().join(".cache/ripcord").join(format!("llvm-{soname}"));
    let stamp = home().join(".cache/ripcord/bpf-linker.stamp");

    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let built_for = std::fs::read_to_string(&stamp).unwrap_or_default();
    if works && built_for.trim() == soname {
        return Ok(());
    }
    if works && built_for.is_empty() {
        // Installed by other means: trust it if it links against this LLVM.
        let ldd = cmd_output("ldd", &[which("bpf-linker")?.to_str().context("path")?])
            .unwrap_or_default();
        if ldd.contains(&soname) {
            std::fs::create_dir_all(stamp.parent().context("parent")?)?;
            std::fs::write(&stamp, &soname)?;
            return Ok(());
        }
    }
    say(&format!(
        "installing bpf-linker for LLVM {major} ({soname}); takes a few minutes"
    ));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&soname), &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    let feature = format!("llvm-{major}");
    let status = Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker --features {feature} failed ({status})");
    }
    std::fs::write(&stamp, &soname)?;
    Ok(())
}

/// "22" from a `rustc -vV` output line "LLVM version: 22.1.4".
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Garage, the S3-compatible server the S3 failover test stores to, from crates.io (the
/// only place its sources can come from here). Skipped when a `garage` is on `PATH` or in
/// `~/.cargo/bin` already, whatever its version.
fn garage() -> anyhow::Result<()> {
    if which("garage").is_ok() || cargo_bin().join("garage").is_file() {
        return Ok(());
    }
    say(&format!(
        "installing garage {GARAGE_VERSION} (S3 server for the S3 test); builds from source, \
         takes 10-30 minutes"
    ));
    let status = Command::new("cargo")
        .args(["install", "garage", "--locked", "--version", GARAGE_VERSION])
        .status()
        .context("running cargo install garage")?;
    if !status.success() {
        bail!("cargo install garage --locked --version {GARAGE_VERSION} failed ({status})");
    }
    Ok(())
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map_or_else(|| home().join(".cargo"), PathBuf::from)
        .join("bin")
}

fn which(bin: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .with_context(|| format!("{bin} not on PATH"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_output() {
        let vv = "rustc 1.97.0-nightly\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("LLVM version: 23.0.0"), Some(23));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
