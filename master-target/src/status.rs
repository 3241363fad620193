//! `ripcord-mt status`: what each followed disk's device holds, from the state files.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    follow::where_is,
    state::{ApplyState, now_ns},
};

/// The state files in `dir`, sorted by disk.
pub fn states(dir: &Path) -> anyhow::Result<Vec<ApplyState>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries {
        let path = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let is_state = path.extension().is_some_and(|x| x == "json")
            && path
                .file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'));
        if is_state && let Some(s) = ApplyState::load(&path)? {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(out)
}

/// Prints the states as text (or JSON lines); `false` when there are none.
pub fn print(dir: &Path, json: bool) -> anyhow::Result<bool> {
    let states = states(dir)?;
    if json {
        for s in &states {
            println!("{}", serde_json::to_string(s).expect("state serializes"));
        }
        return Ok(!states.is_empty());
    }
    if states.is_empty() {
        println!(
            "no disk is followed here ({} has no state file)",
            dir.display()
        );
        return Ok(false);
    }
    for s in &states {
        println!("disk {}", s.disk);
        println!("  device:   {}", s.device.display());
        println!("  state:    {}", where_is(s));
        if let Some(a) = &s.applied {
            let age = now_ns().saturating_sub(a.time_ns) as f64 / 1e9;
            println!(
                "  point:    {} ({}, taken {age:.1} s ago)",
                a.id,
                if a.app_consistent {
                    "app-consistent"
                } else {
                    "crash-consistent"
                }
            );
        }
        println!(
            "  written:  {:.1} MiB in all",
            s.bytes_written as f64 / (1 << 20) as f64
        );
        if let Some(e) = &s.last_error {
            println!("  error:    {e}");
        }
    }
    Ok(true)
}
