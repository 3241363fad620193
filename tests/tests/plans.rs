//! Recovery plans (issue 16, item 2) on real replicated disks: four loop devices protected
//! by an agent, a plan of three groups with scripts that record their order, a manual
//! pause, a failing script, start commands and readiness checks.
//!
//! - `ripcord plan failover` runs the groups in order, pauses at the manual step, goes on
//!   after `ripcord plan resume`, stops at the failing script with a report, and finishes
//!   with `--continue`; every machine's image equals its device, and the report records
//!   every step with its exit status and the points used.
//! - `ripcord plan test-failover` of the same plan runs while replication goes on, into a
//!   scratch directory; replication loses nothing; `ripcord plan cleanup` stops what it
//!   started and removes its images.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use rand::{RngExt as _, SeedableRng as _};
use testkit::Site;

const MIB: u64 = 1 << 20;

/// `ripcord plan <args>`: (success, stdout + stderr).
fn plan(site: &Site, args: &[&str]) -> (bool, String) {
    let out = Command::new(testkit::binary("ripcord"))
        .arg("plan")
        .args(args)
        .env(
            "RIPCORD_PASSPHRASE",
            std::fs::read_to_string(&site.ps.passphrase_file)
                .unwrap()
                .trim(),
        )
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_equal(image: &Path, device: &Path) {
    let diff = testkit::sys::diff_sectors(image, device).expect("compare");
    assert!(
        diff.is_empty(),
        "{} differs from {} in {} sectors",
        image.display(),
        device.display(),
        testkit::ranges::total(&diff)
    );
}

/// Stops the process groups a run started (its state file lists them).
fn stop_started(state: &Path) {
    let Ok(bytes) = std::fs::read(state) else {
        return;
    };
    let state: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    for s in state["started"].as_array().into_iter().flatten() {
        let pid = nix::unistd::Pid::from_raw(s["pid"].as_i64().unwrap() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
fn a_plan_runs_groups_in_order_pauses_stops_and_continues() {
    let Some(site) = Site::builder("a_plan_runs_groups_in_order_pauses_stops_and_continues")
        .file_target()
        .start()
    else {
        return;
    };
    let devices: Vec<_> = (0..4)
        .map(|i| site.loop_device(&format!("m{i}.img"), 16 * MIB))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        ripcord_tests::write_random_at(&d.path, 0, 6, 100 + i as u64);
    }
    let paths: Vec<&Path> = devices.iter().map(|d| d.path.as_path()).collect();
    let agent = site.replicator(&paths);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let disks: Vec<String> = paths.iter().map(|p| site.id.disk_id(p).unwrap()).collect();
    let refs: Vec<&str> = disks.iter().map(String::as_str).collect();
    site.final_points(agent, &refs);

    let dir = site.path().to_owned();
    let log = dir.join("order.log");
    let fail_flag = dir.join("fail-post-app");
    std::fs::write(&fail_flag, "").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = |i: usize| dir.join(format!("recovered-{i}.img"));
    let text = format!(
        r#"name = "erp"
target = "{target}"

[[group]]
name = "db"
pre = [{{ run = "echo pre-db >> {log}" }}]
post = [{{ manual = "check the database" }}]
[[group.machine]]
name = "db1"
disks = [{{ disk = "{d0}", output = "{o0}" }}]
start = "echo \"$RIPCORD_MACHINE $RIPCORD_DISK_0\" >> {log}; exec sleep 600"
ready = {{ command = "test -s $RIPCORD_DISK_0", timeout-secs = 30 }}

[[group]]
name = "app"
pre = [{{ run = "echo pre-app >> {log}" }}]
post = [{{ run = "test -e {flag} && exit 3; echo post-app >> {log}", timeout-secs = 10 }}]
[[group.machine]]
name = "app1"
disks = [{{ disk = "{d1}", output = "{o1}" }}]
[[group.machine]]
name = "app2"
disks = [{{ disk = "{d2}", output = "{o2}" }}]

[[group]]
name = "web"
pre = [{{ run = "echo pre-web >> {log}" }}]
[[group.machine]]
name = "web1"
disks = [{{ disk = "{d3}", output = "{o3}" }}]
ready = {{ tcp = "127.0.0.1:{port}", timeout-secs = 10 }}
"#,
        target = site.target(),
        log = log.display(),
        flag = fail_flag.display(),
        d0 = disks[0],
        d1 = disks[1],
        d2 = disks[2],
        d3 = disks[3],
        o0 = out(0).display(),
        o1 = out(1).display(),
        o2 = out(2).display(),
        o3 = out(3).display(),
    );
    let plan_file = dir.join("erp.toml");
    std::fs::write(&plan_file, &text).unwrap();
    std::fs::set_permissions(&plan_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = plan_file.to_str().unwrap();
    let states = dir.join("plans");
    let s = states.to_str().unwrap();
    let state_file = states.join("erp.json");

    // check: valid, and a plan others may edit is refused (it runs commands).
    let (ok, said) = plan(&site, &["check", p]);
    assert!(ok && said.contains("4 machines, 4 disks"), "{said}");
    std::fs::set_permissions(&plan_file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, said) = plan(&site, &["check", p]);
    assert!(!ok && said.contains("writable by others"), "{said}");
    std::fs::set_permissions(&plan_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Group db runs, then the manual step pauses the plan.
    let (ok, said) = plan(&site, &["failover", "--plan", p, "--state-dir", s]);
    assert!(
        ok && said.contains("paused for a manual step: check the database"),
        "{said}"
    );
    assert_equal(&out(0), &devices[0].path);
    assert!(!out(1).exists(), "group app ran before the pause ended");
    let (ok, said) = plan(&site, &["failover", "--plan", p, "--state-dir", s]);
    assert!(
        !ok && said.contains("plan resume"),
        "a paused run was started over: {said}"
    );

    // The plan file changed during the pause: going on would run steps the run never
    // recorded, so it is refused; put back, it resumes.
    std::fs::write(&plan_file, format!("{text}\n# edited during the pause\n")).unwrap();
    let (ok, said) = plan(&site, &["resume", "--plan", p, "--state-dir", s]);
    assert!(
        !ok && said.contains("changed since run") && said.contains("Put the file back"),
        "{said}"
    );
    assert!(!out(1).exists(), "a changed plan ran");
    std::fs::write(&plan_file, &text).unwrap();

    // Resume: group app fails over, its post script fails; the plan stops and says how
    // to go on.
    let (ok, said) = plan(&site, &["resume", "--plan", p, "--state-dir", s]);
    assert!(
        !ok && said.contains("app: post 1") && said.contains("--continue"),
        "{said}"
    );
    assert_equal(&out(1), &devices[1].path);
    assert_equal(&out(2), &devices[2].path);
    assert!(!out(3).exists(), "group web ran after a failed step");

    // One run at a time: while another `ripcord plan` holds the plan's lock, nothing
    // runs.
    let lock = ripcord_crashsafe::try_lock_exclusive(&states.join("erp.lock"))
        .unwrap()
        .expect("the lock is free between commands");
    let (ok, said) = plan(
        &site,
        &["failover", "--plan", p, "--state-dir", s, "--continue"],
    );
    assert!(!ok && said.contains("being run by another"), "{said}");
    drop(lock);
    // A run whose process died mid-step (its state says running, and nobody holds the
    // lock) counts as failed at that step, and --continue takes it over.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    state["status"] = "running".into();
    std::fs::write(&state_file, state.to_string()).unwrap();
    let (ok, said) = plan(&site, &["failover", "--plan", p, "--state-dir", s]);
    assert!(
        !ok && said.contains("interrupted")
            && said.contains("app: post 1")
            && said.contains("--continue"),
        "{said}"
    );

    // Fixed: --continue runs the failed step again, then group web.
    std::fs::remove_file(&fail_flag).unwrap();
    let (ok, said) = plan(
        &site,
        &["failover", "--plan", p, "--state-dir", s, "--continue"],
    );
    assert!(ok && said.contains("done"), "{said}");
    assert_equal(&out(3), &devices[3].path);
    let order = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(
        lines,
        [
            "pre-db",
            &format!("db1 {}", out(0).display()),
            "pre-app",
            "post-app",
            "pre-web"
        ],
        "steps ran out of order"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    stop_started(&state_file);
    assert_eq!(report["status"], "done", "{report}");
    let steps = report["steps"].as_array().unwrap();
    let failed = steps
        .iter()
        .find(|s| s["status"] == "failed")
        .expect("the failed step is in the report");
    assert_eq!(failed["step"], "app: post 1");
    assert_eq!(failed["exit_code"], 3, "{failed}");
    assert_eq!(report["points"].as_object().unwrap().len(), 4, "{report}");
    let reports = std::fs::read_dir(states.join("reports")).unwrap().count();
    assert_eq!(reports, 1, "one report per run");

    // A readiness check that never passes fails its step by name.
    drop(listener);
    std::fs::remove_file(&state_file).unwrap();
    for i in 0..4 {
        std::fs::remove_file(out(i)).unwrap();
    }
    let broken = text
        .replace("timeout-secs = 10 }\n", "timeout-secs = 2 }\n")
        .replace("post = [{ manual = \"check the database\" }]\n", "");
    let broken_file = dir.join("broken.toml");
    std::fs::write(&broken_file, broken).unwrap();
    std::fs::set_permissions(&broken_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = broken_file.to_str().unwrap();
    let (ok, said) = plan(&site, &["failover", "--plan", b, "--state-dir", s]);
    stop_started(&state_file);
    assert!(
        !ok && said.contains("web: start") && said.contains("nothing accepts TCP connections"),
        "{said}"
    );
    std::fs::remove_file(&state_file).unwrap();
    for i in 0..4 {
        let _ = std::fs::remove_file(out(i));
    }

    // A test failover of the same plan while replication goes on: scratch images, and
    // replication loses nothing.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let agent = site.replicator(&paths);
    agent.wait_synced(Duration::from_secs(60)).unwrap();
    let writer = {
        let d = devices[2].path.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut f = std::fs::OpenOptions::new().write(true).open(d).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            for _ in 0..100 {
                rng.fill(&mut buf[..]);
                f.write_all(&buf).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            f.sync_all().unwrap();
        })
    };
    let scratch = dir.join("scratch");
    let sc = scratch.to_str().unwrap();
    let test_args = [
        "test-failover",
        "--plan",
        p,
        "--state-dir",
        s,
        "--scratch",
        sc,
    ];
    let (ok, said) = plan(&site, &test_args);
    assert!(ok && said.contains("paused"), "{said}");
    let (ok, said) = plan(&site, &["resume", "--plan", p, "--state-dir", s]);
    assert!(ok && said.contains("done"), "{said}");
    let images: Vec<PathBuf> = std::fs::read_dir(scratch.join("erp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 4, "{images:?}");
    for i in 0..4 {
        assert!(
            !out(i).exists(),
            "a test failover wrote the plan's output {i}"
        );
    }
    writer.join().unwrap();
    site.final_points(agent, &refs);
    let (ok, said) = plan(&site, &["cleanup", "--plan", p, "--state-dir", s]);
    assert!(ok && said.contains("removed 4 test image(s)"), "{said}");
    assert_eq!(std::fs::read_dir(scratch.join("erp")).unwrap().count(), 0);
    drop(listener);
    // Replication was not disturbed: the newest point of the written disk is the device.
    let image = dir.join("after.img");
    let (ok, _, err) = testkit::replication::failover(
        site.target(),
        &disks[2],
        "latest",
        &image,
        &site.ps.passphrase_file,
    )
    .unwrap();
    assert!(ok, "{err}");
    assert_equal(&image, &devices[2].path);
}
