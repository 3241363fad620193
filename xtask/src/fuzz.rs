//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (bodies in
//! `crates/fuzz-targets`) one after the other for a share of the time given, each over
//! its corpus `fuzz/corpus/<target>/` (where libFuzzer adds the new inputs it finds) with
//! its `-max_len` from `fuzz/targets.txt`. A target that crashes leaves its input under
//! `fuzz/artifacts/<target>/`; the run goes on with the others and fails at the end.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

/// One line of `fuzz/targets.txt`.
struct Target {
    name: String,
    max_len: usize,
}

fn targets(fuzz_dir: &Path) -> anyhow::Result<Vec<Target>> {
    let path = fuzz_dir.join("targets.txt");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut it = l.split_whitespace();
            let (Some(name), Some(max_len), None) = (it.next(), it.next(), it.next()) else {
                bail!("{}: `{l}` is not `<target> <max_len>`", path.display());
            };
            Ok(Target {
                name: name.to_owned(),
                max_len: max_len
                    .parse()
                    .with_context(|| format!("{}: max_len of {name}", path.display()))?,
            })
        })
        .collect()
}

/// `rustup run nightly cargo <args>` from the workspace root, without the settings of
/// the cargo running this xtask (they would pin the stable toolchain).
fn nightly_cargo(root: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]).current_dir(root);
    for key in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "RUSTC_WRAPPER"] {
        c.env_remove(key);
    }
    c
}

/// Installs cargo-fuzz if `cargo fuzz` is not there.
fn cargo_fuzz(root: &Path) -> anyhow::Result<()> {
    let present = nightly_cargo(root)
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!(
        "xtask fuzz: cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)"
    );
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .env_remove("CARGO")
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz --locked failed ({status})");
    }
    Ok(())
}

/// Runs `only` (or every target) for `minutes` in all, split evenly.
pub fn run(minutes: f64, only: Option<&str>) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let mut all = targets(&fuzz_dir)?;
    if let Some(name) = only {
        all.retain(|t| t.name == name);
        if all.is_empty() {
            bail!("no fuzz target {name}; see fuzz/targets.txt");
        }
    }
    if !minutes.is_finite() || minutes <= 0.0 {
        bail!("--minutes must be a number more than 0");
    }
    cargo_fuzz(&root)?;
    eprintln!("xtask fuzz: building the fuzz targets (cargo +nightly fuzz build)");
    let status = nightly_cargo(&root)
        .args(["fuzz", "build"])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let each = ((minutes * 60.0) / all.len() as f64).max(1.0).round() as u64;
    let mut rows = Vec::new();
    for t in &all {
        let corpus = fuzz_dir.join("corpus").join(&t.name);
        std::fs::create_dir_all(&corpus)?;
        let before = std::fs::read_dir(&corpus)?.count();
        eprintln!(
            "xtask fuzz: {} for {each} s (-max_len={})",
            t.name, t.max_len
        );
        let started = Instant::now();
        let status = nightly_cargo(&root)
            .args(["fuzz", "run", &t.name])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={each}"),
                &format!("-max_len={}", t.max_len),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ])
            .status()
            .with_context(|| format!("running cargo fuzz run {}", t.name))?;
        let after = std::fs::read_dir(&corpus)?.count();
        rows.push((
            t.name.as_str(),
            started.elapsed().as_secs(),
            before,
            after,
            status.success(),
        ));
    }
    println!(
        "\n{:<20} {:>6} {:>8} {:>8}  result",
        "target", "secs", "corpus", "new"
    );
    for (name, secs, before, after, ok) in &rows {
        let result = if *ok {
            "ok".to_owned()
        } else {
            format!("FAILED: input in fuzz/artifacts/{name}/")
        };
        println!(
            "{name:<20} {secs:>6} {after:>8} {:>8}  {result}",
            after.saturating_sub(*before)
        );
    }
    let failed: Vec<&str> = rows.iter().filter(|r| !r.4).map(|r| r.0).collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in {}: reproduce with `cargo +nightly fuzz run <target> \
             fuzz/artifacts/<target>/<file>`, fix, and keep the input as \
             fuzz/corpus/<target>/regress-<what>",
            failed.join(", ")
        );
    }
    println!(
        "xtask fuzz: no failures. New inputs are in fuzz/corpus/<target>/ (ignored by git; \
         rename one to regress-<what> to keep it)."
    );
    Ok(())
}
