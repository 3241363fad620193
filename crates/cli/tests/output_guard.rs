//! `ripcord failover` onto block devices (root: loop devices, mounts): a device in use —
//! mounted, a partition of it mounted, or protected by a running agent — is refused with
//! the reason and left untouched; an idle device is written byte-exact; `--force`
//! overrides the agent's lock. Everything made is undone on drop, also on failure.

mod common;

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use common::{Fixture, RunRipcord as _, SIZE, output_text};
use testkit::{Lab, LoopDevice, Mount};

const DEVICE_BYTES: u64 = 16 << 20;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn prefix(dev: &Path, len: u64) -> Vec<u8> {
    let mut all = std::fs::read(dev).expect("reading the device");
    all.truncate(len as usize);
    all
}

/// An ext4 on `dev`, mounted in the lab, with a file on it, and nothing of it left for
/// the kernel to write: inode tables and journal initialised by mkfs (no lazy init thread
/// writing later), and the file system synced (the superblock's last-mounted field, set
/// when the first file is opened, reaches the device at a journal commit seconds later
/// otherwise). Then any change to the device's bytes is somebody else's write.
fn mounted_ext4(lab: &Lab, dev: &Path, name: &str) -> Mount {
    testkit::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            dev.to_str().expect("utf-8 path"),
        ],
    )
    .expect("mkfs.ext4");
    let m = Mount::new(dev, &lab.path().join(name), &[]).expect("mounting");
    std::fs::write(m.dir.join("keep"), b"in use").expect("writing a file");
    testkit::run(
        "sync",
        &["-f", m.dir.join("keep").to_str().expect("utf-8 path")],
    )
    .expect("syncing the file system");
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_refuses_a_mounted_device_and_leaves_it_alone() {
    let Some(lab) = Lab::new("cli-mounted") else {
        return;
    };
    let f = Fixture::new().await;
    let dev = lab.loop_device("disk", DEVICE_BYTES);
    let m = mounted_ext4(&lab, &dev.path, "mnt");
    let before = prefix(&dev.path, 1 << 20);
    let o = f.failover_into(&dev.path, &[]);
    let text = output_text(&o);
    assert!(
        !o.status.success(),
        "failover wrote a mounted device:\n{text}"
    );
    assert!(
        stderr(&o).contains(&format!(
            "refusing to overwrite {}: {} is mounted on {}",
            dev.path.display(),
            dev.path.display(),
            m.dir.display()
        )) && stderr(&o).contains("--force"),
        "the refusal does not say why:\n{text}"
    );
    assert_eq!(prefix(&dev.path, 1 << 20), before, "the device was written");
    assert_eq!(std::fs::read(m.dir.join("keep")).expect("file"), b"in use");
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_refuses_a_disk_whose_partition_is_mounted() {
    let Some(lab) = Lab::new("cli-partition") else {
        return;
    };
    let f = Fixture::new().await;
    let mut dev = lab.loop_device("disk", DEVICE_BYTES);
    let parts = dev.partition(&[None]).expect("partitioning");
    let _m = mounted_ext4(&lab, &parts[0], "mnt");
    let o = f.failover_into(&dev.path, &[]);
    let text = output_text(&o);
    assert!(!o.status.success(), "failover wrote a disk in use:\n{text}");
    assert!(
        stderr(&o).contains("its partition") && stderr(&o).contains("is mounted on"),
        "the refusal does not name the mounted partition:\n{text}"
    );
}

/// An agent's protection lock on a device: the lock file, held `LOCK_EX`; removed on drop
/// if this test made it.
struct AgentLock {
    path: PathBuf,
    made: bool,
    _held: nix::fcntl::Flock<File>,
}

impl AgentLock {
    fn take(dev: &Path) -> AgentLock {
        let rdev = std::fs::metadata(dev).expect("device").rdev();
        let dir = Path::new("/run/ripcord/lock");
        std::fs::create_dir_all(dir).expect("creating the lock directory");
        let path = dir.join(format!(
            "{}:{}.lock",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        ));
        let made = !path.exists();
        let file = File::create(&path).expect("lock file");
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("taking the lock");
        AgentLock {
            path,
            made,
            _held: held,
        }
    }
}

impl Drop for AgentLock {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_refuses_a_device_an_agent_protects_unless_forced() {
    let Some(lab) = Lab::new("cli-protected") else {
        return;
    };
    let f = Fixture::new().await;
    let dev = lab.loop_device("disk", DEVICE_BYTES);
    let lock = AgentLock::take(&dev.path);
    let o = f.failover_into(&dev.path, &[]);
    let text = output_text(&o);
    assert!(
        !o.status.success(),
        "failover wrote a protected device:\n{text}"
    );
    assert!(
        stderr(&o).contains("is protected by a running ripcord agent")
            && stderr(&o).contains(&lock.path.display().to_string()),
        "the refusal does not name the agent's lock:\n{text}"
    );
    assert!(
        prefix(&dev.path, SIZE).iter().all(|&b| b == 0),
        "the device was written"
    );
    let o = f.failover_into(&dev.path, &["--force"]);
    let text = output_text(&o);
    assert!(o.status.success(), "--force did not override:\n{text}");
    assert!(stderr(&o).contains("warning: --force"), "{text}");
    assert_eq!(
        &prefix(&dev.path, SIZE),
        f.images.last().expect("an image"),
        "the forced failover is not byte-exact"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_writes_an_idle_device_byte_exact() {
    let Some(lab) = Lab::new("cli-idle") else {
        return;
    };
    let f = Fixture::new().await;
    let dev: LoopDevice = lab.loop_device("disk", DEVICE_BYTES);
    let o = f.failover_into(&dev.path, &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(
        &prefix(&dev.path, SIZE),
        f.images.last().expect("an image"),
        "the failover is not byte-exact"
    );
}
