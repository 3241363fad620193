//! The master target (`ripcord-mt`) as the tests and the chaos engine drive it: a
//! `follow` process killed on drop, `status --json` and `failback`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{Site, replication::free_tcp_port};

/// `ripcord-mt <command>` on `disk` of the site's store, applied to `device` with its
/// state in `state_dir`.
pub fn mt_command(
    site: &Site,
    command: &str,
    disk: &str,
    device: &Path,
    state_dir: &Path,
) -> Command {
    let mut c = Command::new(crate::binary("ripcord-mt"));
    c.args([command, "--target", site.target(), "--disk", disk])
        .arg("--device")
        .arg(device)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--passphrase-file")
        .arg(&site.ps.passphrase_file)
        .env("RUST_BACKTRACE", "0");
    c
}

/// A running `ripcord-mt follow`, killed on drop.
pub struct MasterTarget {
    child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl MasterTarget {
    pub fn start(
        site: &Site,
        disk: &str,
        device: &Path,
        state_dir: &Path,
        run: usize,
    ) -> MasterTarget {
        let log = site.path().join(format!("mt-{run}.log"));
        let metrics_port = free_tcp_port();
        let child = mt_command(site, "follow", disk, device, state_dir)
            .args(["--poll-ms", "100", "--metrics-listen"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting ripcord-mt");
        MasterTarget {
            child,
            log,
            metrics_port,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..600 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ripcord-mt did not stop within 30 s:\n{}", self.log());
    }
}

impl Drop for MasterTarget {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `ripcord-mt status --json` of `state_dir`: one state per followed disk.
pub fn mt_status(state_dir: &Path) -> (Option<i32>, Vec<serde_json::Value>) {
    let out = Command::new(crate::binary("ripcord-mt"))
        .args(["status", "--json", "--state-dir"])
        .arg(state_dir)
        .output()
        .expect("running ripcord-mt status");
    let states = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("status --json prints JSON lines"))
        .collect();
    (out.status.code(), states)
}

/// `ripcord-mt failback`: (success, stdout, stderr).
pub fn mt_failback(
    site: &Site,
    disk: &str,
    device: &Path,
    state_dir: &Path,
) -> (bool, String, String) {
    let out = mt_command(site, "failback", disk, device, state_dir)
        .output()
        .expect("running ripcord-mt failback");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
