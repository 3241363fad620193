//! The configuration database on a real SQLite file: state survives reopening, operator
//! actions and their audit entries commit together, references and the audit log's
//! append-only rule hold even against SQL run beside the library, a database from a
//! newer release is refused, and consistency groups keep their bounds.

use std::path::Path;

use ripcord_control::{
    ControlDb, ControlError, Disk, DiskReport, Group, Health, MAX_GROUP_MACHINES, Policy,
    ProcessServer, Severity,
};

fn server(id: &str, config_role: bool) -> ProcessServer {
    ProcessServer {
        id: id.to_owned(),
        address: format!("{id}.example:4433"),
        version: "0.1.0".to_owned(),
        cert_sha256: format!("{id}-cert"),
        config_role,
        registered_at: 100,
        last_heartbeat: None,
        health: Health::Red,
        fingerprint: format!("{id}-host"),
        load: None,
    }
}

fn disk(id: &str, machine: &str) -> DiskReport {
    DiskReport {
        id: id.to_owned(),
        machine: machine.to_owned(),
        device: "/dev/sdb".to_owned(),
        size_bytes: 1 << 30,
        epoch: Some(2),
        acked_seq: Some(41),
        last_point_at: Some(300),
        current_at: None,
    }
}

/// What `disk(id, machine)` reads back as.
fn recorded(id: &str, machine: &str) -> Disk {
    Disk {
        id: id.to_owned(),
        machine: machine.to_owned(),
        device: "/dev/sdb".to_owned(),
        size_bytes: 1 << 30,
        epoch: 2,
        acked_seq: 41,
        last_point_at: Some(300),
        current_at: None,
    }
}

fn deployment(path: &Path) -> ControlDb {
    let mut db = ControlDb::open(path).unwrap();
    db.upsert_process_server(&server("ps1", true)).unwrap();
    db.upsert_process_server(&server("ps2", false)).unwrap();
    db.register_machine("db01", "db01-cert", 200, "ps1")
        .unwrap();
    db.record_disks(&[disk("d-1", "db01")]).unwrap();
    db
}

#[test]
fn state_survives_reopening_and_the_schema_is_current() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    {
        let mut db = deployment(&path);
        db.heartbeat("ps1", 400, Health::Green).unwrap();
        assert_eq!(
            db.schema_version().unwrap(),
            ripcord_control::schema::version()
        );
    }
    let db = ControlDb::open(&path).unwrap();
    let servers = db.process_servers().unwrap();
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0].health, Health::Green);
    assert_eq!(servers[0].last_heartbeat, Some(400));
    assert!(servers[0].config_role && !servers[1].config_role);
    assert_eq!(servers[1].health, Health::Red, "no heartbeat yet: red");
    let disks = db.disks().unwrap();
    assert_eq!((disks[0].epoch, disks[0].acked_seq), (2, 41));
    assert_eq!(
        db.machines().unwrap()[0].process_server.as_deref(),
        Some("ps1")
    );
}

#[test]
fn an_operator_action_and_its_audit_entry_commit_together() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));

    let err = db.move_machine("db01", "ps9", "alice", 500).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownProcessServer(ref s) if s == "ps9"),
        "{err}"
    );
    let err = db.move_machine("nobody", "ps2", "alice", 500).unwrap_err();
    assert!(matches!(err, ControlError::UnknownMachine(_)), "{err}");
    assert!(
        db.audit_log(10).unwrap().is_empty(),
        "a refused action was audited"
    );

    db.move_machine("db01", "ps2", "alice", 501).unwrap();
    assert_eq!(
        db.machines().unwrap()[0].process_server.as_deref(),
        Some("ps2")
    );
    let policy = Policy {
        name: "gold".to_owned(),
        rpo_threshold_secs: 30,
        retention_secs: 72 * 3600,
        app_interval_secs: 3600,
    };
    db.set_policy(&policy, "bob", 502).unwrap();
    assert!(db.machine_policies().unwrap().is_empty());
    db.assign_policy("db01", "gold", "bob", 503).unwrap();
    assert_eq!(
        db.machine_policies().unwrap(),
        [("db01".to_owned(), policy.clone())]
    );
    let err = db.assign_policy("db01", "silver", "bob", 504).unwrap_err();
    assert!(matches!(err, ControlError::UnknownPolicy(_)), "{err}");
    db.audit("carol", "create-token", "1 use, 24 h", 505)
        .unwrap();

    let log = db.audit_log(10).unwrap();
    let actions: Vec<_> = log
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("alice", "move-machine", "db01: ps1 -> ps2"),
            (
                "bob",
                "set-policy",
                "gold: rpo-threshold 30 s, retention 259200 s, app points every 3600 s"
            ),
            ("bob", "assign-policy", "db01: gold"),
            ("carol", "create-token", "1 use, 24 h"),
        ]
    );
    assert_eq!(
        db.audit_log(2).unwrap()[0].action,
        "assign-policy",
        "newest two"
    );
    assert_eq!(db.policies().unwrap(), [policy]);
    assert_eq!(db.machines().unwrap()[0].policy.as_deref(), Some("gold"));
}

#[test]
fn a_server_with_machines_is_not_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let err = db.remove_process_server("ps1", "alice", 600).unwrap_err();
    assert!(
        matches!(err, ControlError::ServerHasMachines { machines: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("move them first"), "{err}");
    db.move_machine("db01", "ps2", "alice", 601).unwrap();
    db.remove_process_server("ps1", "alice", 602).unwrap();
    assert_eq!(db.process_servers().unwrap().len(), 1);
    let err = db.remove_process_server("ps1", "alice", 603).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownProcessServer(_)),
        "{err}"
    );
    let err = db.heartbeat("ps1", 604, Health::Green).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownProcessServer(_)),
        "{err}"
    );
}

#[test]
fn lag_is_sampled_at_most_every_interval_and_old_samples_go() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    // disk d-1 of db01 has its newest point at 300 (see `disk`).
    db.sample_lag(310, 5, 100).unwrap();
    db.sample_lag(312, 5, 100).unwrap(); // within the interval: no sample
    db.sample_lag(316, 5, 100).unwrap();
    assert_eq!(
        db.lag_history(0).unwrap(),
        [("d-1".to_owned(), 310, 10), ("d-1".to_owned(), 316, 16)]
    );
    db.sample_lag(415, 5, 100).unwrap();
    assert_eq!(
        db.lag_history(0).unwrap(),
        [("d-1".to_owned(), 316, 16), ("d-1".to_owned(), 415, 115)],
        "the sample older than 100 s went"
    );
    assert_eq!(db.lag_history(400).unwrap().len(), 1);
}

/// An idle disk's point stays current: its lag runs from the last time its server saw the
/// point hold every write, not from the point's commit. A report without that time (an
/// older server, or a server that restarted) keeps the recorded one, and it never moves
/// back.
#[test]
fn the_lag_runs_from_when_the_newest_point_was_last_current() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let lag = |db: &ControlDb, now| db.disks().unwrap()[0].lag_secs(now);
    assert_eq!(
        lag(&db, 330),
        Some(30),
        "no currency reported: the point's age"
    );
    let mut report = disk("d-1", "db01");
    report.current_at = Some(325);
    db.record_disks(&[report.clone()]).unwrap();
    assert_eq!(lag(&db, 330), Some(5));
    db.sample_lag(330, 5, 100).unwrap();
    assert_eq!(db.lag_history(0).unwrap(), [("d-1".to_owned(), 330, 5)]);
    for (current_at, why) in [(None, "a report without it"), (Some(310), "an older time")] {
        report.current_at = current_at;
        db.record_disks(&[report.clone()]).unwrap();
        assert_eq!(db.disks().unwrap()[0].current_at, Some(325), "{why}");
    }
    // A newer point than the last currency: the lag runs from the point.
    report.last_point_at = Some(328);
    db.record_disks(&[report]).unwrap();
    assert_eq!(lag(&db, 330), Some(2));
    assert_eq!(
        Disk {
            last_point_at: None,
            ..recorded("d-2", "db01")
        }
        .lag_secs(330),
        None,
        "no point, no lag"
    );
}

#[test]
fn a_joining_server_never_takes_over_a_registered_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let ps3 = server("ps3", false);
    db.join_process_server(&ps3, "token:abc").unwrap();
    assert_eq!(db.process_server("ps3").unwrap(), Some(ps3.clone()));
    let thief = ProcessServer {
        cert_sha256: "thief-cert".to_owned(),
        fingerprint: "elsewhere".to_owned(),
        ..ps3.clone()
    };
    let err = db.join_process_server(&thief, "token:def").unwrap_err();
    assert!(matches!(err, ControlError::ProcessServerExists(_)), "{err}");
    assert!(err.to_string().contains("ripcord ps remove"), "{err}");
    assert_eq!(
        db.process_server("ps3").unwrap(),
        Some(ps3),
        "the first one stays"
    );
    let joins: Vec<_> = db
        .audit_log(10)
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "join-process-server")
        .collect();
    assert_eq!(joins.len(), 1, "{joins:?}");
    assert_eq!(joins[0].actor, "token:abc");
    assert_eq!(db.process_server("nobody").unwrap(), None);
    let load = ripcord_control::ServerLoad {
        cpu_percent: 12.5,
        memory_percent: 40.0,
        cache_free_percent: 71.0,
    };
    db.record_load("ps3", &load).unwrap();
    assert_eq!(db.process_server("ps3").unwrap().unwrap().load, Some(load));
}

#[test]
fn a_report_with_a_disk_of_an_unknown_machine_is_refused_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let mut newer = disk("d-1", "db01");
    newer.acked_seq = Some(99);
    // One report holds a disk of an unknown machine: none of it is recorded.
    let err = db
        .record_disks(&[newer.clone(), disk("d-2", "ghost")])
        .unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownMachine(ref m) if m == "ghost"),
        "{err}"
    );
    assert_eq!(db.disks().unwrap(), [recorded("d-1", "db01")]);
    db.record_disks(&[newer]).unwrap();
    assert_eq!(db.disks().unwrap()[0].acked_seq, 99);
}

/// A server that just restarted knows neither the disk's position nor its newest point
/// yet: its report keeps what was recorded instead of erasing it.
#[test]
fn unknown_values_in_a_report_keep_what_was_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let mut fresh = disk("d-1", "db01");
    fresh.epoch = None;
    fresh.acked_seq = None;
    fresh.last_point_at = None;
    fresh.device = "/dev/sdz".to_owned();
    db.record_disks(&[fresh.clone()]).unwrap();
    let d = &db.disks().unwrap()[0];
    assert_eq!(
        (d.epoch, d.acked_seq, d.last_point_at, d.device.as_str()),
        (2, 41, Some(300), "/dev/sdz")
    );
    // A disk first reported with nothing known starts at zero, with no point.
    fresh.id = "d-9".to_owned();
    db.record_disks(&[fresh]).unwrap();
    let d = &db.disks().unwrap()[1];
    assert_eq!((d.epoch, d.acked_seq, d.last_point_at), (0, 0, None));
}

#[test]
fn one_open_alert_per_subject_and_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    assert!(
        db.raise_alert("ps1", "cache-space", Severity::Warning, "29% free", 700)
            .unwrap()
    );
    assert!(
        !db.raise_alert("ps1", "cache-space", Severity::Critical, "20% free", 701)
            .unwrap(),
        "raised twice while open"
    );
    assert!(
        db.raise_alert("d-1", "rpo", Severity::Warning, "lag 40 s", 702)
            .unwrap()
    );
    let open = db.open_alerts().unwrap();
    assert_eq!(open.len(), 2);
    assert_eq!(open[0].message, "29% free", "the open alert was rewritten");
    assert!(db.clear_alert("ps1", "cache-space", 710).unwrap());
    assert!(!db.clear_alert("ps1", "cache-space", 711).unwrap());
    assert!(
        db.raise_alert("ps1", "cache-space", Severity::Critical, "20% free", 720)
            .unwrap()
    );
    let all = db.all_alerts().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].cleared_at, Some(710));
    assert_eq!(db.open_alerts().unwrap().len(), 2);
}

/// The attacker is anyone who runs SQL against the file beside the library (a careless
/// script, a compromised tool): the audit log still cannot be rewritten or trimmed, and
/// references still hold.
#[test]
fn the_audit_log_and_references_hold_against_sql_beside_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    let mut db = deployment(&path);
    db.move_machine("db01", "ps2", "alice", 800).unwrap();
    drop(db);
    let raw = rusqlite::Connection::open(&path).unwrap();
    for sql in ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"] {
        let err = raw.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    raw.pragma_update(None, "foreign_keys", "ON").unwrap();
    let err = raw
        .execute("UPDATE machines SET process_server = 'ps9'", [])
        .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    let err = raw
        .execute("UPDATE process_servers SET health = 'purple'", [])
        .unwrap_err();
    assert!(err.to_string().contains("CHECK"), "{err}");
    drop(raw);
    let db = ControlDb::open(&path).unwrap();
    assert_eq!(db.audit_log(10).unwrap()[0].actor, "alice");
}

#[test]
fn a_database_from_a_newer_release_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    drop(deployment(&path));
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    let err = ControlDb::open(&path)
        .err()
        .expect("a newer database opened");
    let msg = err.to_string();
    assert!(
        matches!(err, ControlError::Migrate { .. }) && msg.contains("control.db"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = ControlDb::open(&path).err().expect("garbage opened");
    assert!(err.to_string().contains("control.db"), "{err}");
}

#[test]
fn a_reader_opens_only_a_current_database_and_never_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    let err = ControlDb::open_read_only(&path)
        .err()
        .expect("a missing database opened");
    assert!(matches!(err, ControlError::Missing { .. }), "{err}");
    assert!(!path.exists(), "the reader created the database");
    drop(deployment(&path));
    let mut reader = ControlDb::open_read_only(&path).unwrap();
    assert_eq!(reader.machines().unwrap().len(), 1);
    let err = reader.heartbeat("ps1", 1, Health::Green).unwrap_err();
    assert!(err.to_string().contains("readonly"), "{err}");
    drop(reader);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.pragma_update(None, "user_version", 8).unwrap();
    drop(raw);
    let err = ControlDb::open_read_only(&path)
        .err()
        .expect("schema 8 opened");
    assert!(
        matches!(
            err,
            ControlError::SchemaMismatch {
                found: 8,
                expected: 7,
                ..
            }
        ),
        "{err}"
    );
}

/// `deployment` with machines `names` registered beside db01 (on ps1, no disks).
fn with_machines(path: &Path, names: &[&str]) -> ControlDb {
    let mut db = deployment(path);
    for name in names {
        db.register_machine(name, &format!("{name}-cert"), 200, "ps1")
            .unwrap();
    }
    db
}

#[test]
fn a_group_is_created_filled_and_listed_with_its_machines_sorted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = with_machines(&tmp.path().join("control.db"), &["web02", "app01"]);
    let id = db
        .create_group("shop", 5_000, 50_000, "alice", 900)
        .unwrap();
    assert_eq!(id.to_string().len(), 32);
    for machine in ["web02", "db01", "app01"] {
        assert!(db.add_to_group("shop", machine, "alice", 901).unwrap());
    }
    assert!(
        !db.add_to_group("shop", "db01", "alice", 902).unwrap(),
        "a member added again changes nothing"
    );
    let shop = Group {
        name: "shop".to_owned(),
        id,
        interval_ms: 5_000,
        max_error_us: 50_000,
        machines: vec!["app01".to_owned(), "db01".to_owned(), "web02".to_owned()],
        created_at: 900,
        app_every: 0,
    };
    assert_eq!(db.groups().unwrap(), std::slice::from_ref(&shop));
    // Every 12th instant application-consistent; past a day of 1 s instants is refused.
    db.set_group_app_every("shop", 12, "alice", 902).unwrap();
    assert_eq!(db.groups().unwrap()[0].app_every, 12);
    assert!(matches!(
        db.set_group_app_every("shop", 86_401, "alice", 902),
        Err(ControlError::GroupAppEveryOutOfRange { app_every: 86_401 })
    ));
    db.set_group_app_every("shop", 0, "alice", 902).unwrap();
    assert_eq!(db.group_of("web02").unwrap(), Some(shop.clone()));
    assert_eq!(db.group_of("nobody").unwrap(), None);

    db.create_group("empty", 60_000, 1_000, "alice", 903)
        .unwrap();
    db.set_group_timing("shop", 10_000, 20_000, "bob", 904)
        .unwrap();
    let groups = db.groups().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(
        (groups[0].name.as_str(), groups[0].machines.len()),
        ("empty", 0),
        "a group without machines is listed"
    );
    assert_eq!(
        groups[1],
        Group {
            interval_ms: 10_000,
            max_error_us: 20_000,
            ..shop
        }
    );

    let err = db
        .create_group("shop", 5_000, 50_000, "alice", 905)
        .unwrap_err();
    assert!(
        matches!(err, ControlError::GroupExists(ref g) if g == "shop"),
        "{err}"
    );
    // Made again under its old name, a group has another id.
    db.delete_group("shop", "alice", 906).unwrap();
    let again = db
        .create_group("shop", 5_000, 50_000, "alice", 907)
        .unwrap();
    assert_ne!(again, id);

    // The state survives reopening.
    drop(db);
    let db = ControlDb::open(&tmp.path().join("control.db")).unwrap();
    assert_eq!(db.groups().unwrap()[1].id, again);
}

#[test]
fn a_machine_is_in_at_most_one_group() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    db.create_group("g1", 5_000, 50_000, "alice", 900).unwrap();
    db.create_group("g2", 5_000, 50_000, "alice", 900).unwrap();
    db.add_to_group("g1", "db01", "alice", 901).unwrap();
    let err = db.add_to_group("g2", "db01", "alice", 902).unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::MachineInOtherGroup { ref machine, ref group }
                if machine == "db01" && group == "g1"
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("ripcord group remove --name g1 --machine db01"),
        "{err}"
    );
    let err = db
        .remove_from_group("g2", "db01", "alice", 903)
        .unwrap_err();
    assert!(
        matches!(err, ControlError::NotInGroup { ref group, .. } if group == "g2"),
        "{err}"
    );
    db.remove_from_group("g1", "db01", "alice", 904).unwrap();
    assert_eq!(db.group_of("db01").unwrap(), None);
    db.add_to_group("g2", "db01", "alice", 905).unwrap();
    assert_eq!(db.group_of("db01").unwrap().unwrap().name, "g2");
    assert!(db.groups().unwrap()[0].machines.is_empty());
}

#[test]
fn a_group_holds_at_most_64_machines() {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..MAX_GROUP_MACHINES)
        .map(|i| format!("m{i:02}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut db = with_machines(&tmp.path().join("control.db"), &refs);
    db.create_group("big", 5_000, 50_000, "alice", 900).unwrap();
    for name in &refs {
        db.add_to_group("big", name, "alice", 901).unwrap();
    }
    // db01 would be the 65th.
    let err = db.add_to_group("big", "db01", "alice", 902).unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::GroupFull { ref machine, max: 64, .. } if machine == "db01"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("\"db01\" was not added"), "{err}");
    assert_eq!(db.groups().unwrap()[0].machines.len(), MAX_GROUP_MACHINES);
    assert_eq!(db.group_of("db01").unwrap(), None);
}

#[test]
fn a_group_spans_at_most_256_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = with_machines(&tmp.path().join("control.db"), &["big"]);
    // db01 has one disk (see `deployment`); big gets 256.
    let disks: Vec<DiskReport> = (0..256).map(|i| disk(&format!("b-{i}"), "big")).collect();
    db.record_disks(&disks).unwrap();
    db.create_group("g", 5_000, 50_000, "alice", 900).unwrap();
    db.add_to_group("g", "big", "alice", 901).unwrap();
    let err = db.add_to_group("g", "db01", "alice", 902).unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::GroupTooManyDisks { disks: 257, max: 256, ref machine, .. }
                if machine == "db01"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("257 disks"), "{err}");
}

#[test]
fn deleting_a_group_removes_its_memberships_not_its_machines() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    let mut db = with_machines(&path, &["web01"]);
    db.create_group("g1", 5_000, 50_000, "alice", 900).unwrap();
    db.add_to_group("g1", "db01", "alice", 901).unwrap();
    db.add_to_group("g1", "web01", "alice", 901).unwrap();
    db.delete_group("g1", "alice", 902).unwrap();
    assert!(db.groups().unwrap().is_empty());
    assert_eq!(db.group_of("db01").unwrap(), None);
    assert_eq!(db.machines().unwrap().len(), 2, "the machines stay");
    let err = db.delete_group("g1", "alice", 903).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownGroup(ref g) if g == "g1"),
        "{err}"
    );
    // The members' rows went with the group, so the machines are free to join another.
    db.create_group("g2", 5_000, 50_000, "alice", 904).unwrap();
    db.add_to_group("g2", "db01", "alice", 905).unwrap();
    drop(db);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = raw
        .query_row("SELECT count(*) FROM group_members", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}

#[test]
fn group_changes_are_audited_and_refusals_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let id = db.create_group("g1", 5_000, 50_000, "alice", 900).unwrap();
    db.set_group_timing("g1", 2_000, 10_000, "bob", 901)
        .unwrap();
    db.add_to_group("g1", "db01", "bob", 902).unwrap();
    db.add_to_group("g1", "db01", "bob", 903).unwrap(); // a member already: nothing
    assert!(db.add_to_group("g1", "ghost", "bob", 904).is_err());
    assert!(db.set_group_timing("g1", 1, 10_000, "bob", 905).is_err());
    db.remove_from_group("g1", "db01", "carol", 906).unwrap();
    db.add_to_group("g1", "db01", "carol", 907).unwrap();
    db.delete_group("g1", "dave", 908).unwrap();
    let log: Vec<_> = db
        .audit_log(20)
        .unwrap()
        .into_iter()
        .map(|e| (e.at, e.actor, e.action, e.detail))
        .collect();
    let entry = |at: i64, actor: &str, action: &str, detail: &str| {
        (at, actor.to_owned(), action.to_owned(), detail.to_owned())
    };
    assert_eq!(
        log,
        [
            entry(
                900,
                "alice",
                "create-group",
                &format!("g1 ({id}): every 5000 ms, max error 50000 us")
            ),
            entry(
                901,
                "bob",
                "set-group-timing",
                "g1: every 5000 -> 2000 ms, max error 50000 -> 10000 us"
            ),
            entry(902, "bob", "add-to-group", "g1: db01"),
            entry(906, "carol", "remove-from-group", "g1: db01"),
            entry(907, "carol", "add-to-group", "g1: db01"),
            entry(908, "dave", "delete-group", "g1 (machines: db01)"),
        ]
    );
}

#[test]
fn group_bounds_and_unknown_names_are_refused_naming_the_value() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = deployment(&tmp.path().join("control.db"));
    let long = "x".repeat(65);
    for (name, interval_ms, max_error_us, named) in [
        ("g", 999, 50_000, "999 ms"),
        ("g", 3_600_001, 50_000, "3600001 ms"),
        ("g", 5_000, 99, "99 us"),
        ("g", 5_000, 10_000_001, "10000001 us"),
        ("", 5_000, 50_000, "\"\""),
        ("a b", 5_000, 50_000, "\"a b\""),
        ("g/1", 5_000, 50_000, "\"g/1\""),
        (long.as_str(), 5_000, 50_000, long.as_str()),
    ] {
        let err = db
            .create_group(name, interval_ms, max_error_us, "alice", 900)
            .unwrap_err();
        assert!(
            err.to_string().contains(named),
            "{name:?} {interval_ms} {max_error_us}: {err}"
        );
    }
    // The bounds themselves are allowed.
    db.create_group("lo", 1_000, 100, "alice", 900).unwrap();
    db.create_group(&"x".repeat(64), 3_600_000, 10_000_000, "alice", 900)
        .unwrap();
    let err = db
        .set_group_timing("lo", 5_000, 0, "alice", 901)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::GroupMaxErrorOutOfRange { max_error_us: 0 }
        ),
        "{err}"
    );

    let err = db.add_to_group("nope", "db01", "alice", 902).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownGroup(ref g) if g == "nope"),
        "{err}"
    );
    assert!(err.to_string().contains("\"nope\""), "{err}");
    let err = db.add_to_group("lo", "ghost", "alice", 902).unwrap_err();
    assert!(
        matches!(err, ControlError::UnknownMachine(ref m) if m == "ghost"),
        "{err}"
    );
    assert!(err.to_string().contains("\"ghost\""), "{err}");
    let err = db
        .set_group_timing("nope", 5_000, 50_000, "alice", 903)
        .unwrap_err();
    assert!(matches!(err, ControlError::UnknownGroup(_)), "{err}");
    let err = db
        .remove_from_group("lo", "ghost", "alice", 903)
        .unwrap_err();
    assert!(matches!(err, ControlError::UnknownMachine(_)), "{err}");

    let actions: Vec<_> = db
        .audit_log(20)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        ["create-group", "create-group"],
        "refusals audited"
    );
    assert_eq!(db.groups().unwrap().len(), 2);
}

/// SQL run beside the library still cannot make a group the library would refuse to read
/// (a short id, a name with other characters) or a member that is no registered machine.
#[test]
fn group_rows_hold_against_sql_beside_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.db");
    let mut db = deployment(&path);
    db.create_group("g1", 5_000, 50_000, "alice", 900).unwrap();
    drop(db);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.pragma_update(None, "foreign_keys", "ON").unwrap();
    for (sql, why) in [
        (
            "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at) VALUES ('g2', zeroblob(15), 5000, 50000, 1)",
            "CHECK",
        ),
        (
            "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at) VALUES ('g 2', zeroblob(16), 5000, 50000, 1)",
            "CHECK",
        ),
        (
            "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at) VALUES ('g2', '0123456789abcdef', 5000, 50000, 1)",
            "CHECK",
        ),
        (
            "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at) SELECT 'g2', id, 5000, 50000, 1 FROM groups",
            "UNIQUE",
        ),
        (
            "INSERT INTO group_members VALUES ('ghost', 'g1', 1)",
            "FOREIGN KEY",
        ),
        (
            "INSERT INTO group_members VALUES ('db01', 'nope', 1)",
            "FOREIGN KEY",
        ),
    ] {
        let err = raw.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains(why), "{sql}: {err}");
    }
    raw.execute(
        "INSERT INTO groups (name, id, interval_ms, max_error_us, created_at) VALUES ('a-b_9', zeroblob(16), 5000, 50000, 1)",
        [],
    )
    .unwrap();
    raw.execute("INSERT INTO group_members VALUES ('db01', 'g1', 1)", [])
        .unwrap();
    let err = raw
        .execute("INSERT INTO group_members VALUES ('db01', 'a-b_9', 1)", [])
        .unwrap_err();
    assert!(
        err.to_string().contains("UNIQUE"),
        "one group per machine: {err}"
    );
}
