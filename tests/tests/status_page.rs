//! The configuration role's status page (issue 15, item 6), rendered in a real headless
//! browser (Chromium, installed by `cargo xtask setup`): it shows every process server
//! with its health colour, every machine with its disks and a lag-over-time chart, and it
//! comes back, with its history, after a restart of the configuration role. The test
//! asserts on the DOM Chromium rendered (`--dump-dom`) and takes a screenshot.
//!
//! Needs root (loop devices, BPF). Skips loudly without it, and fails under `CI=true`;
//! a missing Chromium fails (never skips) the test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use testkit::{
    Site,
    replication::{Replicator, wait_for},
};

const MIB: u64 = 1 << 20;

/// Headless Chromium with its profile in `profile`.
fn chromium(profile: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    cmd
}

/// The DOM Chromium rendered for `url`.
fn rendered_dom(profile: &Path, url: &str) -> String {
    let out = chromium(profile, &["--dump-dom", url])
        .output()
        .unwrap_or_else(|e| panic!("running chromium (cargo xtask setup installs it): {e}"));
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `attr` on the element whose id is `id`, in `dom`.
fn attribute(dom: &str, id: &str, attr: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..start].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let value = tag.split(&format!("{attr}=\"")).nth(1)?;
    Some(value[..value.find('"')?].to_owned())
}

/// The number of lag samples the chart of disk `disk` draws.
fn samples(dom: &str, disk: &str) -> usize {
    let Some(chart) = dom.find(&format!("id=\"chart-{disk}\"")) else {
        return 0;
    };
    dom[chart..]
        .split("data-samples=\"")
        .nth(1)
        .and_then(|v| v[..v.find('"')?].parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_status_page_shows_every_machine_its_health_and_its_lag_chart_in_a_browser() {
    let Some(mut site) = Site::builder(
        "the_status_page_shows_every_machine_its_health_and_its_lag_chart_in_a_browser",
    )
    .file_target()
    .ps_config("[health]\nsample-ms = 200\n")
    .machine("db01")
    .start() else {
        return;
    };
    let profile: PathBuf = site.subdir("chromium");
    let url = format!("http://127.0.0.1:{}/", site.ps.metrics_port);
    // web01 registers while the config role's server is the only one (so it is placed
    // there whatever this host's load); ps2 joins after.
    let web = site.register("web01");
    let ps2 = site.ps.join(&site.subdir("servers"), "ps2").unwrap();
    let db_disk = site.loop_device("db.img", 16 * MIB);
    let web_disk = site.loop_device("web.img", 16 * MIB);
    let db_agent = site.replicator(&[&db_disk.path]);
    let web_agent = Replicator::start(&web, &[&web_disk.path], &[]).unwrap();
    db_agent.wait_synced(Duration::from_secs(60)).unwrap();
    web_agent.wait_synced(Duration::from_secs(60)).unwrap();
    let db_id = site.id.disk_id(&db_disk.path).unwrap();
    let web_id = web.disk_id(&web_disk.path).unwrap();

    // Each chart needs two samples (one every 5 s) to draw a line.
    let mut dom = String::new();
    wait_for(
        "the page to chart two lag samples of each disk",
        Duration::from_secs(60),
        || {
            dom = rendered_dom(&profile, &url);
            Ok(samples(&dom, &db_id) >= 2 && samples(&dom, &web_id) >= 2)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{dom}\n{}", site.ps.logs()));
    let own = site.ps.dir.join("ps.toml");
    let own_id = std::fs::read_to_string(&own)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("server-id = \""))
        .map(|v| v.trim_end_matches('"').to_owned());
    for (machine, server) in [("db01", own_id.as_deref()), ("web01", own_id.as_deref())] {
        assert_eq!(
            attribute(&dom, &format!("machine-{machine}"), "data-health").as_deref(),
            Some("green"),
            "{machine} in:\n{dom}"
        );
        if let Some(server) = server {
            assert_eq!(
                attribute(&dom, &format!("machine-{machine}"), "data-server").as_deref(),
                Some(server)
            );
        }
    }
    assert_eq!(
        attribute(&dom, "server-ps2", "data-health").as_deref(),
        Some("green"),
        "{dom}"
    );
    for shown in [db_id.as_str(), web_id.as_str(), "Process servers", "Alerts"] {
        assert!(dom.contains(shown), "{shown} not in:\n{dom}");
    }
    assert!(
        dom.contains("<polyline class=\"lag-line\""),
        "no chart line:\n{dom}"
    );

    // Every figure shown is also a Prometheus series, next to the server's own.
    let metrics = ripcord_tests::http_get(site.ps.metrics_port, "/metrics");
    use ripcord_tests::metric;
    assert_eq!(metric(&metrics, "ripcord_config_up", ""), 1.0);
    assert_eq!(
        metric(&metrics, "ripcord_config_server_health", "server=\"ps2\""),
        0.0
    );
    for (disk, machine) in [(&db_id, "db01"), (&web_id, "web01")] {
        let label = format!("disk=\"{disk}\",machine=\"{machine}\"");
        assert!(metric(&metrics, "ripcord_config_disk_lag_seconds", &label) >= 0.0);
        assert!(metric(&metrics, "ripcord_config_disk_acked_seq", &label) >= 1.0);
    }
    assert!(metric(&metrics, "ripcord_ps_connections", "") >= 0.0);
    assert_eq!(
        metrics.matches("# EOF").count(),
        1,
        "one OpenMetrics document:\n{metrics}"
    );

    // A screenshot of the rendered page: a real PNG of the whole view.
    let shot = site.path().join("status.png");
    let out = chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
            &url,
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a {} byte screenshot is blank",
        png.len()
    );

    // A restart of the configuration role: the page comes back with what it showed,
    // the charts' history included; ps2 reported throughout and reports again.
    let before = samples(&dom, &db_id);
    site.ps.stop().unwrap();
    site.ps.spawn().unwrap();
    wait_for(
        "the page to come back after a restart",
        Duration::from_secs(60),
        || {
            dom = rendered_dom(&profile, &url);
            Ok(samples(&dom, &db_id) >= before
                && attribute(&dom, "server-ps2", "data-health").as_deref() == Some("green")
                && dom.contains("id=\"machine-web01\""))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{dom}\n{}", ps2.logs()));
    let (ok, _) = db_agent.stop().unwrap();
    assert!(ok);
    let (ok, _) = web_agent.stop().unwrap();
    assert!(ok);
}
