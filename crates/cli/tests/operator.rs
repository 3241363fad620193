//! The `ripcord` binary tells the operator the truth, in words: it refuses to overwrite
//! an existing image, fails on a target that holds no store, names unknown disks and bad
//! points with what to do, prints no Rust debug text, refuses a passphrase file others can
//! read, and writes images only its user can read. No root needed (see `output_guard.rs`
//! for block devices).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{DISK, Fixture, RunRipcord as _, assert_image, output_text};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// No Rust `Debug` rendering of the CLI's or the store's types reaches the user.
fn assert_no_debug_text(text: &str) {
    for debug in [
        "Latest",
        "Id(\"",
        "At(",
        "VerifyReport",
        "GcReport",
        "{ ",
        "Some(",
    ] {
        assert!(!text.contains(debug), "debug text `{debug}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_refuses_an_existing_image_and_leaves_it_untouched() {
    let f = Fixture::new().await;
    let img = f.tmp.path().join("precious.img");
    std::fs::write(&img, b"someone's data").expect("writing the file");
    let o = f.failover_into(&img, &[]);
    let text = output_text(&o);
    assert!(!o.status.success(), "failover overwrote a file:\n{text}");
    assert!(
        stderr(&o).contains(&format!("{} already exists", img.display()))
            && stderr(&o).contains("--force"),
        "the refusal does not say why and how:\n{text}"
    );
    assert_eq!(std::fs::read(&img).expect("reading"), b"someone's data");
    assert!(
        !f.tmp.path().join("precious.img.partial").exists(),
        "a refused failover left a partial image"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_with_force_replaces_an_existing_image_with_a_private_one() {
    let f = Fixture::new().await;
    let img = f.tmp.path().join("old.img");
    std::fs::write(&img, b"stale").expect("writing the file");
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let o = f.failover_into(&img, &["--force"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_image(&img, f.images.last().expect("an image"));
    assert_eq!(mode(&img), 0o600, "the image must be private");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_failover_image_is_private() {
    let f = Fixture::new().await;
    let img = f.tmp.path().join("new.img");
    let o = f.failover_into(&img, &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(mode(&img), 0o600, "the image must be private");
    assert_no_debug_text(&stdout(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_failover_twice_makes_two_private_images_in_a_private_scratch_dir() {
    let f = Fixture::new().await;
    let scratch = f.tmp.path().join("scratch");
    let (url, disk, pass) = (f.url(), DISK.to_string(), f.pass());
    let mut images = Vec::new();
    for _ in 0..2 {
        let o = f.ripcord(&[
            "test-failover",
            "--target",
            &url,
            "--disk",
            &disk,
            "--scratch",
            scratch.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ]);
        assert!(o.status.success(), "{}", output_text(&o));
        let out = stdout(&o);
        let path = out
            .lines()
            .find_map(|l| l.strip_prefix("test image: "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("no test image named:\n{out}"))
            .to_owned();
        images.push(path);
    }
    assert_ne!(
        images[0], images[1],
        "the second test failover reused a name"
    );
    assert_eq!(
        mode(&scratch),
        0o700,
        "the scratch directory must be private"
    );
    for i in &images {
        assert_eq!(mode(Path::new(i)), 0o600, "{i} must be private");
        assert_image(Path::new(i), f.images.last().expect("an image"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passphrase_file_others_can_read_is_refused_with_the_fix() {
    let f = Fixture::new().await;
    let pass = f.pass();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let img = f.tmp.path().join("x.img");
    let o = f.failover_into(&img, &[]);
    let want = format!(
        "passphrase file {p} is readable by others (mode 0644); run chmod 600 {p}",
        p = pass.display()
    );
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(stderr(&o).contains(&want), "{}", output_text(&o));
    assert!(!img.exists(), "an image was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_directory_that_does_not_exist_is_an_error_naming_it() {
    let f = Fixture::new().await;
    let missing = f.tmp.path().join("no-such-store");
    let url = format!("file://{}", missing.display());
    for args in [
        vec!["points", "list", "--target", &url],
        vec!["verify", "--target", &url],
    ] {
        let o = f.ripcord(&args);
        let text = output_text(&o);
        assert!(!o.status.success(), "{args:?} succeeded:\n{text}");
        assert!(
            stderr(&o).contains(&format!("no ripcord store at `{url}`"))
                && stderr(&o).contains("does not exist"),
            "{args:?} does not name the missing store:\n{text}"
        );
        assert!(stdout(&o).is_empty(), "{args:?} printed a result:\n{text}");
    }
    assert!(!missing.exists(), "reading a store created its directory");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_without_a_store_is_an_error() {
    let f = Fixture::new().await;
    let empty = f.tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let url = format!("file://{}", empty.display());
    let o = f.ripcord(&["points", "list", "--target", &url]);
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(
        stderr(&o).contains(&format!("no ripcord store at `{url}`"))
            && stderr(&o).contains("escrow.json"),
        "{}",
        output_text(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_path_target_names_the_accepted_forms_and_the_file_url() {
    let f = Fixture::new().await;
    let o = f.ripcord(&["points", "list", "--target", "/var/lib/x"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(
        err.contains("file:///abs/path")
            && err.contains("s3://bucket/prefix")
            && err.contains("file:///var/lib/x")
            && !err.contains("memory://"),
        "{}",
        output_text(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_disk_is_named_with_how_to_list_the_disks() {
    let f = Fixture::new().await;
    let other = "00112233445566778899aabbccddeeff";
    let url = f.url();
    let o = f.ripcord(&["points", "list", "--target", &url, "--disk", other]);
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(
        stderr(&o).contains(&format!(
            "no disk {other} in {url}; `ripcord points list --target {url}` lists them"
        )),
        "{}",
        output_text(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_point_lists_the_valid_forms_and_no_debug_text() {
    let f = Fixture::new().await;
    let img = f.tmp.path().join("p.img");
    for point in ["yesterday", "3-x", "17-", "3-17-1"] {
        let o = f.failover_into(&img, &["--point", point]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{}", output_text(&o));
        assert!(
            err.contains("latest-app") && err.contains("RFC 3339") && err.contains("3-17"),
            "--point {point}: the valid forms are not listed:\n{err}"
        );
        assert_no_debug_text(&err);
    }
    let o = f.failover_into(&img, &["--point", "2000-01-01T00:00:00Z"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(
        err.contains("has no recovery point at or before 2000-01-01T00:00:00"),
        "{err}"
    );
    assert_no_debug_text(&err);
    let o = f.failover_into(&img, &["--point", "9-9"]);
    let err = stderr(&o);
    assert!(err.contains("no recovery point with id 9-9"), "{err}");
    assert!(!img.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn points_list_shows_the_machine_of_each_disk() {
    let f = Fixture::new().await;
    let url = f.url();
    let o = f.ripcord(&["points", "list", "--target", &url]);
    assert!(o.status.success(), "{}", output_text(&o));
    let out = stdout(&o);
    assert!(
        out.lines().next().is_some_and(|h| h.contains("machine")),
        "{out}"
    );
    assert!(
        out.lines()
            .skip(1)
            .all(|l| l.contains(&DISK.to_string()) && l.contains(common::MACHINE)),
        "{out}"
    );
    let o = f.ripcord(&["points", "list", "--json", "--target", &url]);
    let first: serde_json::Value =
        serde_json::from_str(stdout(&o).lines().next().expect("a point")).expect("json");
    assert_eq!(first["machine"], common::MACHINE);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_in_words_or_json() {
    let f = Fixture::new().await;
    let o = f.verify();
    let out = stdout(&o);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        out.starts_with("verify: OK: 1 disk(s)") && out.contains("authenticated"),
        "{out}"
    );
    assert_no_debug_text(&out);
    let (url, pass) = (f.url(), f.pass());
    let o = f.ripcord(&[
        "verify",
        "--json",
        "--target",
        &url,
        "--passphrase-file",
        pass.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["disks"], 1, "{v}");
    assert_eq!(v["damaged"], serde_json::json!([]), "{v}");
}

#[test]
fn version_says_ripcord() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ripcord"))
        .arg("--version")
        .output()
        .expect("running ripcord");
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!("ripcord {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}
