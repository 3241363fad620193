//! Replays the fuzz corpus under `cargo test`: every file of `fuzz/corpus/<target>/`
//! (seeds, and inputs kept from fuzzing) through its target; a panic fails the test
//! naming the file, and so does a `valid-*` seed its decoder refuses. Every target must have a non-empty corpus, a harness binary and a
//! `fuzz/targets.txt` line, and every seed must be in the corpus.
//!
//! `RIPCORD_WRITE_CORPUS=1 cargo test -p ripcord-fuzz-targets --test corpus` rewrites the
//! seeds (`valid-*`, `hostile-*`) from the encoders.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::Once,
};

use ripcord_fuzz_targets::{TARGETS, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// `fuzz/corpus`, with the seeds rewritten first (once) if `RIPCORD_WRITE_CORPUS` is set.
fn corpus_root() -> PathBuf {
    static WRITE: Once = Once::new();
    let root = fuzz_dir().join("corpus");
    WRITE.call_once(|| {
        if std::env::var_os("RIPCORD_WRITE_CORPUS").is_some() {
            seeds::write_corpus(&root).expect("writing the seed corpus");
        }
    });
    root
}

#[test]
fn every_corpus_file_replays() {
    let root = corpus_root();
    let mut failures = Vec::new();
    let mut files = 0;
    for &(name, run) in TARGETS {
        let dir = root.join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                failures.push(format!(
                    "{}: {e} (target {name} has no corpus)",
                    dir.display()
                ));
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("a corpus entry").path()).collect();
        paths.sort();
        if paths.is_empty() {
            failures.push(format!("{}: empty corpus for target {name}", dir.display()));
        }
        for path in paths {
            let data = std::fs::read(&path).expect("reading a corpus file");
            files += 1;
            let valid = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("valid-"));
            match catch_unwind(AssertUnwindSafe(|| {
                ripcord_fuzz_targets::accepts(run, &data)
            })) {
                Ok(false) if valid => {
                    failures.push(format!("{}: a valid seed is refused", path.display()));
                }
                Ok(_) => {}
                Err(p) => {
                    let why = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("non-string panic");
                    failures.push(format!("{}: panicked: {why}", path.display()));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {files} corpus files failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_seed_is_in_the_corpus() {
    let root = corpus_root();
    for (target, name, bytes) in seeds::valid() {
        let path = root.join(target).join(format!("valid-{name}"));
        match std::fs::read(&path) {
            Ok(on_disk) if on_disk == bytes => {}
            Ok(_) => panic!(
                "{} differs from its generator; rewrite with RIPCORD_WRITE_CORPUS=1",
                path.display()
            ),
            Err(e) => panic!(
                "{}: {e}; write it with RIPCORD_WRITE_CORPUS=1",
                path.display()
            ),
        }
    }
}

#[test]
fn every_target_has_a_harness_and_a_length_limit() {
    let listed = std::fs::read_to_string(fuzz_dir().join("targets.txt")).expect("fuzz/targets.txt");
    let listed: Vec<&str> = listed
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        listed, names,
        "fuzz/targets.txt lists other targets than TARGETS"
    );
    let cargo = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for name in names {
        let bin = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        assert!(
            text.contains(&format!("ripcord_fuzz_targets::{name}(")),
            "{} does not call ripcord_fuzz_targets::{name}",
            bin.display()
        );
        assert!(
            cargo.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
}
