//! The README's "Running it by hand" commands, run as written: taken from README.md itself
//! at test time, with only paths, ports, the server's address, the placeholders (token,
//! CA hash, disk id) and the devices substituted. If the README drifts from the product,
//! this test fails.
//!
//! The commands use the products' default locations (`/var/lib/ripcord/...`,
//! `/etc/ripcord/agent.toml`); they run in a private mount namespace (`unshare --mount`)
//! with a tmpfs over `/var/lib/ripcord` and `/etc/ripcord`, so the host's are never
//! touched. Needs root. Skips loudly without it, and fails under `CI=true`.

use std::process::Command;

use testkit::{Lab, replication::free_udp_port};

const MIB: u64 = 1 << 20;

/// The shell block under the "Running it by hand" heading, one command per entry
/// (continuation lines joined; comments and blank lines dropped).
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(testkit::workspace_root().join("README.md")).unwrap();
    let section = readme
        .split_once("### Running it by hand")
        .expect("README.md has no \"### Running it by hand\" section")
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("no ```sh block under \"Running it by hand\"")
        .0;
    let mut commands = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        // Trailing comments ("# Ctrl-C flushes ...") are for people.
        let code = line.split(" # ").next().unwrap_or(line).trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        commands.push(std::mem::take(&mut pending));
    }
    commands
}

/// What the test runs around a README command that needs it (values from earlier
/// commands' output, waits, the workload). Keyed by the command's start; every key must
/// match a README command, so a renamed or removed command fails the test.
fn around(command: &str) -> Option<(&'static str, &'static str)> {
    const INIT: &str = r#"
TOKEN=$(sed -n 's/^token: *//p' "$W/init.out")
CA_HASH=$(sed -n 's/^ca-hash: *//p' "$W/init.out")
sed -i -e "s/^listen = .*/listen = \"127.0.0.1:$DATA_PORT\"/" \
    -e "s/^register-listen = .*/register-listen = \"127.0.0.1:$REG_PORT\"/" \
    -e "s/^metrics-listen = .*/metrics-listen = \"\"/" \
    -e "s/^upload-interval-ms = .*/upload-interval-ms = 500/" \
    -e "s/^min-free-mib = .*/min-free-mib = 16/" /var/lib/ripcord/ps/ps.toml
"#;
    const SERVE: &str = r#"
PS=$!
for _ in $(seq 300); do grep -q "ripcord-ps serving" "$W/ps.log" && break; sleep 0.1; done
grep -q "ripcord-ps serving" "$W/ps.log"
"#;
    const PROTECT: &str = r#"
AGENT=$!
for _ in $(seq 600); do
    DISK=$(ripcord points list --target file:///var/lib/ripcord/ps/target --json 2>/dev/null \
        | sed -n 's/.*"disk":"\([0-9a-f]*\)".*/\1/p' | head -1)
    [ -n "$DISK" ] && break
    sleep 0.2
done
[ -n "$DISK" ]
dd if=/dev/urandom of="$SRC" bs=1M count=4 seek=8 oflag=direct status=none
sync
"#;
    // `status` runs while the agent does; then the agent is stopped as the README says
    // (Ctrl-C), and the test waits until the store has its last point.
    const STATUS: &str = r#"
kill -INT $AGENT
wait $AGENT
AGENT=
# The agent's last cut is durable on the server; wait until the store has it too.
last=
for _ in $(seq 100); do
    now=$(ripcord points list --target file:///var/lib/ripcord/ps/target --json | tail -1)
    [ -n "$now" ] && [ "$now" = "$last" ] && break
    last=$now
    sleep 1
done
"#;
    const TOKEN: &str = r#"
NEW_TOKEN=$(sed -n 's/^token: *//p' "$W/token.out")
ripcord-agent register --server 127.0.0.1:$REG_PORT --token "$NEW_TOKEN" --ca-hash "$CA_HASH" \
    --machine-id old-host --state-dir "$W/old-host"
"#;
    const REPLAY: &str = "kill -INT $PS\nwait $PS\nPS=\n";
    let key = |prefix: &str| command.starts_with(prefix);
    if key("ripcord-ps init") {
        Some(("", INIT))
    } else if key("ripcord-ps serve") {
        Some(("", SERVE))
    } else if key("ripcord-agent protect") {
        Some(("", PROTECT))
    } else if key("ripcord-agent status") {
        Some(("", STATUS))
    } else if key("ripcord-ps token") {
        Some(("", TOKEN))
    } else if key("ripcord-ps replay") {
        Some((REPLAY, ""))
    } else {
        None
    }
}

/// A README command with its placeholders and paths substituted, its output captured
/// where later steps need it.
fn substitute(command: &str) -> String {
    let mut c = command
        .replace("/root/pass", "$W/pass")
        .replace("ps.example:9442", "127.0.0.1:$REG_PORT")
        .replace("ps.example", "127.0.0.1")
        .replace("<token>", "\"$TOKEN\"")
        .replace("sha256:<hash>", "\"$CA_HASH\"")
        .replace("<disk id>", "$DISK")
        .replace("/dev/sdb", "$SRC")
        .replace("/dev/sdc", "$DST")
        .replace("sdb.img", "$W/sdb.img");
    if c.starts_with("ripcord-ps init") {
        c.push_str(" | tee \"$W/init.out\"");
    } else if c.starts_with("ripcord-ps token") {
        c.push_str(" | tee \"$W/token.out\"");
    } else if let Some(head) = c.strip_suffix('&') {
        c = format!("{head} >\"$W/ps.log\" 2>&1 &");
    } else if c.starts_with("ripcord-agent protect") {
        c.push_str(" >\"$W/agent.log\" 2>&1 &");
    }
    c
}

#[test]
fn the_readme_by_hand_commands_work_as_written() {
    let Some(lab) = Lab::new("the_readme_by_hand_commands_work_as_written") else {
        return;
    };
    let commands = readme_commands();
    for needed in [
        "ripcord-ps init",
        "ripcord-ps serve",
        "ripcord-agent register",
        "ripcord-agent protect",
        "ripcord-agent status",
        "ripcord-ps token",
        "ripcord failover",
        "ripcord-ps replay",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(needed)),
            "the README's by-hand section lost `{needed}`:\n{commands:#?}"
        );
    }
    let src = lab.loop_device("sdb.img", 64 * MIB);
    let dst = lab.loop_device("sdc.img", 64 * MIB);
    testkit::run("mkfs.ext4", &["-q", src.path.to_str().unwrap()]).unwrap();

    let bin = lab.subdir("bin");
    for name in ["ripcord", "ripcord-ps", "ripcord-agent"] {
        std::os::unix::fs::symlink(testkit::binary(name), bin.join(name)).unwrap();
    }
    // Whatever happens, the script's processes end with it.
    let mut script = String::from(
        "set -euo pipefail\nset -x\nPS=\nAGENT=\n\
         trap 'for p in $AGENT $PS; do kill -9 $p 2>/dev/null || true; done' EXIT\n",
    );
    for command in &commands {
        let (before, after) = around(command).unwrap_or_default();
        script.push_str(before);
        script.push_str(&substitute(command));
        script.push('\n');
        script.push_str(after);
    }
    // What the commands promise: the failed-over device and the replayed image both equal
    // the source (it is quiet: the agent stopped after its last write was durable).
    script.push_str("cmp \"$SRC\" \"$DST\"\ncmp \"$SRC\" \"$W/sdb.img\"\necho README-OK\n");
    let script_path = lab.path().join("readme.sh");
    std::fs::write(&script_path, &script).unwrap();

    // Mount points for the private tmpfs mounts (made if missing, removed after).
    let _mount_points =
        testkit::sys::MountPoints::make(["/var/lib/ripcord", "/etc/ripcord"]).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c"])
        .arg(
            "mount -t tmpfs -o mode=0755 tmpfs /var/lib/ripcord && \
             mount -t tmpfs -o mode=0755 tmpfs /etc/ripcord && \
             exec bash \"$0\"",
        )
        .arg(&script_path)
        .env("PATH", path)
        .env("W", lab.path())
        .env("SRC", &src.path)
        .env("DST", &dst.path)
        .env("DATA_PORT", free_udp_port().to_string())
        .env("REG_PORT", free_udp_port().to_string())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let log = |name: &str| std::fs::read_to_string(lab.path().join(name)).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("README-OK"),
        "the README's commands failed ({}):\n--- script output\n{stdout}\n{}\n--- ps.log\n{}\n\
         --- agent.log\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log("ps.log"),
        log("agent.log"),
    );
}
