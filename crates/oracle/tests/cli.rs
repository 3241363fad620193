//! Command-line exit codes.

use std::process::Command;

use ripcord_oracle::Log;
use ripcord_oracle::sim::{SimOptions, simulate, synthesize_image};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ripcord-oracle"))
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = simulate(&SimOptions {
        ops: 500,
        ..Default::default()
    });
    let log = Log::from_bytes(&bytes).unwrap();
    let t = log.ops[250].submit_ns + 1;
    let mut img = synthesize_image(&log, t);
    let logp = dir.path().join("log");
    let imgp = dir.path().join("img");
    std::fs::write(&logp, &bytes).unwrap();
    std::fs::write(&imgp, &img).unwrap();
    let run = |args: &[&str]| {
        let o = bin().args(args).output().unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let ts = t.to_string();
    let base = [
        "check",
        "--image",
        imgp.to_str().unwrap(),
        "--log",
        logp.to_str().unwrap(),
        "--time",
        &ts,
    ];
    let (c, out) = run(&base);
    assert_eq!(c, 0, "{out}");
    assert!(out.starts_with("PASS"), "{out}");

    // Flip a bit in a stamped block: exit 1 with the block named.
    let b = (0..img.len() / 4096)
        .find(|&b| img[b * 4096] == b'R')
        .unwrap();
    img[b * 4096 + 100] ^= 1;
    std::fs::write(&imgp, &img).unwrap();
    let (c, out) = run(&base);
    assert_eq!(c, 1, "{out}");
    assert!(out.contains(&format!("block {b}: corrupt")), "{out}");

    // Garbage log, missing image, bad arguments: exit 2.
    std::fs::write(dir.path().join("junk"), b"not a log at all, definitely not").unwrap();
    let junk = dir.path().join("junk");
    let (c, out) = run(&[
        "check",
        "--image",
        imgp.to_str().unwrap(),
        "--log",
        junk.to_str().unwrap(),
        "--time",
        "1",
    ]);
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("not a ripcord-oracle log"), "{out}");
    let (c, _) = run(&[
        "check",
        "--image",
        "/nonexistent",
        "--log",
        logp.to_str().unwrap(),
        "--time",
        "1",
    ]);
    assert_eq!(c, 2);
    let (c, _) = run(&["check", "--image", "x"]);
    assert_eq!(c, 2);
    let (c, _) = run(&[
        "check", "--image", "x", "--log", "y", "--time", "1", "--region", "5",
    ]);
    assert_eq!(c, 2);
    let (c, out) = run(&["now"]);
    assert_eq!(c, 0);
    assert!(out.trim().parse::<u64>().is_ok());
}
