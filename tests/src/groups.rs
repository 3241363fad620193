//! Consistency groups through the CLI, for the group tests (`groups.rs`, `group_app.rs`):
//! creating a group of the site's machines and reading its points from the target store.

use std::time::{Duration, Instant};

use testkit::{Site, replication::ripcord};

/// `ripcord <args>` with the site's passphrase; panics with its output if it fails.
pub fn cli(site: &Site, args: &[&str]) -> String {
    let (ok, out, err) = ripcord(args, &site.ps.passphrase_file).unwrap();
    assert!(ok, "ripcord {args:?} failed:\n{out}{err}");
    out
}

/// `ripcord group create` of `group` (interval 1 s, `max_error_ms`) in the site's
/// deployment, then `group add` of `machines`, then `group set` with `set` if any.
pub fn create_group(site: &Site, group: &str, max_error_ms: u64, machines: &[&str], set: &[&str]) {
    let dep = site.ps.dir.to_str().unwrap();
    let max_error = max_error_ms.to_string();
    cli(
        site,
        &[
            "group",
            "create",
            "--deployment",
            dep,
            "--name",
            group,
            "--interval-secs",
            "1",
            "--max-error-ms",
            &max_error,
        ],
    );
    let mut add = vec!["group", "add", "--deployment", dep, "--name", group];
    for m in machines {
        add.extend(["--machine", m]);
    }
    cli(site, &add);
    if !set.is_empty() {
        let mut args = vec!["group", "set", "--deployment", dep, "--name", group];
        args.extend(set);
        cli(site, &args);
    }
}

/// The points of `group` (`group points --json` rows) whose instant is at or after
/// `since_ns`.
pub fn group_points(site: &Site, group: &str, since_ns: u64) -> Vec<serde_json::Value> {
    let dep = site.ps.dir.to_str().unwrap();
    let (ok, out, err) = ripcord(
        &[
            "group",
            "points",
            "--deployment",
            dep,
            "--target",
            site.target(),
            "--name",
            group,
            "--json",
        ],
        &site.ps.passphrase_file,
    )
    .unwrap();
    if !ok {
        // The store may not hold a point yet.
        assert!(err.contains("no recovery point") || err.is_empty(), "{err}");
        return Vec::new();
    }
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|p| p["instant_ns"].as_u64().unwrap() >= since_ns)
        .collect()
}

/// Waits up to `within` until `group` has `want` points at or after `since_ns` that
/// `keep` accepts; returns them (all it found). Panics with `logs()` on the timeout.
pub fn wait_for_group_points(
    site: &Site,
    group: &str,
    since_ns: u64,
    want: usize,
    within: Duration,
    keep: &dyn Fn(&serde_json::Value) -> bool,
    logs: &dyn Fn() -> String,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let points: Vec<_> = group_points(site, group, since_ns)
            .into_iter()
            .filter(|p| keep(p))
            .collect();
        if points.len() >= want {
            return points;
        }
        assert!(
            Instant::now() < deadline,
            "only {} group points within {within:?} (want {want});\n{}",
            points.len(),
            logs()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The id of `disk`'s recovery point in group point `point` (a `group points --json` row).
pub fn member_point<'a>(point: &'a serde_json::Value, disk: &str) -> &'a str {
    point["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["disk"] == disk)
        .unwrap_or_else(|| panic!("disk {disk} missing from {point}"))["point"]
        .as_str()
        .unwrap()
}
