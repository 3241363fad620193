//! Loop devices, partitions and mounts, cleaned up on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Run a command; fail with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    run_output(program, args).map(drop)
}

/// Run a command and return its stdout.
pub fn run_output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A loop device over a sparse file; detached and the file removed on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    pub backing: PathBuf,
    pub size: u64,
    /// Partition nodes this process created with mknod (no udev), removed on drop.
    made_nodes: Vec<PathBuf>,
}

impl LoopDevice {
    /// A loop device of `size` bytes over a new sparse file `backing`.
    pub fn create(backing: &Path, size: u64) -> anyhow::Result<LoopDevice> {
        Self::create_with(backing, size, &[])
    }

    /// Like [`LoopDevice::create`], with extra `losetup` arguments (e.g. `-P` to scan
    /// partitions, `--direct-io=on`).
    pub fn create_with(backing: &Path, size: u64, extra: &[&str]) -> anyhow::Result<LoopDevice> {
        let f = std::fs::File::create(backing)
            .with_context(|| format!("creating {}", backing.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing {}", backing.display()))?;
        drop(f);
        let backing_s = backing.to_str().context("non-UTF-8 path")?;
        let mut args = vec!["-f", "--show"];
        args.extend_from_slice(extra);
        args.push(backing_s);
        let out = run_output("losetup", &args)?;
        let path = PathBuf::from(out.trim());
        // Queue limits outlive an attachment: undo what an earlier test (or a crashed
        // run) may have set on this device number.
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            let queue = PathBuf::from(format!("/sys/block/{name}/queue"));
            if let Ok(hw) = std::fs::read_to_string(queue.join("max_hw_sectors_kb")) {
                let _ = std::fs::write(queue.join("max_sectors_kb"), hw.trim());
            }
        }
        Ok(LoopDevice {
            path,
            backing: backing.to_owned(),
            size,
            made_nodes: Vec::new(),
        })
    }

    /// A loop device over an existing image file (the file is kept on drop).
    pub fn attach(image: &Path) -> anyhow::Result<LoopDevice> {
        let out = run_output(
            "losetup",
            &["-f", "--show", image.to_str().context("path")?],
        )?;
        Ok(LoopDevice {
            path: PathBuf::from(out.trim()),
            backing: PathBuf::new(),
            size: std::fs::metadata(image)?.len(),
            made_nodes: Vec::new(),
        })
    }

    /// Write a GPT with the given partitions (sizes in MiB, the last may be `None` for
    /// "the rest") and rescan; returns the partition device paths.
    pub fn partition(&mut self, sizes_mib: &[Option<u64>]) -> anyhow::Result<Vec<PathBuf>> {
        let mut script = String::from("label: gpt\n");
        for s in sizes_mib {
            match s {
                Some(mib) => script.push_str(&format!("size={mib}MiB\n")),
                None => script.push_str("size=+\n"),
            }
        }
        let mut child = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&self.path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("running sfdisk")?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(script.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("sfdisk failed on {}: {status}", self.path.display());
        }
        let dev = self.path.to_str().context("path")?;
        run("partx", &["--add", dev]).or_else(|_| run("partx", &["--update", dev]))?;
        let parts: Vec<PathBuf> = (1..=sizes_mib.len())
            .map(|i| PathBuf::from(format!("{dev}p{i}")))
            .collect();
        for p in &parts {
            // udev may be absent: create the node from sysfs if needed.
            if !p.exists() {
                let name = p
                    .file_name()
                    .context("name")?
                    .to_string_lossy()
                    .into_owned();
                let devnum = std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))
                    .with_context(|| format!("partition {name} did not appear in sysfs"))?;
                let (ma, mi) = devnum.trim().split_once(':').context("dev format")?;
                run("mknod", &[p.to_str().context("path")?, "b", ma, mi])?;
                self.made_nodes.push(p.clone());
            }
        }
        Ok(parts)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(dev) = self.path.to_str() {
            for node in &self.made_nodes {
                let _ = std::fs::remove_file(node);
            }
            let _ = run("partx", &["--delete", dev]);
            if let Err(e) = run("losetup", &["-d", dev]) {
                eprintln!("warning: detaching {dev}: {e:#}");
            }
        }
        if !self.backing.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.backing);
        }
    }
}

/// A zram device (a bio-based block device: its bios complete without a request),
/// hot-added for one test and removed on drop.
pub struct Zram {
    pub path: PathBuf,
    id: u32,
}

impl Zram {
    /// A new zram device of `size` bytes (`/sys/class/zram-control/hot_add`).
    pub fn create(size: u64) -> anyhow::Result<Zram> {
        let id: u32 = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .context("adding a zram device (is the zram module loaded?)")?
            .trim()
            .parse()
            .context("parsing zram-control/hot_add")?;
        let zram = Zram {
            path: PathBuf::from(format!("/dev/zram{id}")),
            id,
        };
        std::fs::write(format!("/sys/block/zram{id}/disksize"), size.to_string())
            .with_context(|| format!("sizing zram{id}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !zram.path.exists() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} did not appear",
                zram.path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(zram)
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let id = self.id;
        let _ = std::fs::write(format!("/sys/block/zram{id}/reset"), "1");
        if let Err(e) = std::fs::write("/sys/class/zram-control/hot_remove", id.to_string()) {
            eprintln!("warning: removing zram{id}: {e}");
        }
    }
}

/// A mounted file system; unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &Path, dir: &Path, options: &[&str]) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let mut args = vec![];
        args.extend_from_slice(options);
        args.push(dev.to_str().context("path")?);
        args.push(dir.to_str().context("path")?);
        run("mount", &args)?;
        Ok(Mount {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// Unmount now (flushing the file system), reporting errors.
    /// Unmount, retrying for up to 10 s while the mount is busy (an agent taking an
    /// app-consistent point holds the mount point open while it is frozen).
    pub fn unmount(mut self) -> anyhow::Result<()> {
        let dir = self.dir.to_str().context("path")?.to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match run("umount", &[&dir]) {
                Ok(()) => {
                    self.mounted = false;
                    return Ok(());
                }
                Err(e)
                    if std::time::Instant::now() < deadline
                        && format!("{e:#}").contains("busy") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Mount {
    /// Thaws, then unmounts: a file system left frozen (an agent killed during an
    /// application-consistent point) would otherwise outlive its unmount, frozen and
    /// unreachable, holding its loop device until the host reboots (a freeze holds the
    /// superblock). Thawing one that is not frozen fails harmlessly.
    fn drop(&mut self) {
        if self.mounted
            && let Some(d) = self.dir.to_str()
        {
            let _ = run("fsfreeze", &["-u", d]);
            if run("umount", &[d]).is_err() {
                let _ = run("umount", &["-l", d]);
            }
        }
    }
}

/// A file system frozen (`fsfreeze -f`: every write and fsync on it waits) for a test;
/// thawed on drop, whatever happens.
pub struct Frozen {
    dir: PathBuf,
    frozen: bool,
}

impl Frozen {
    pub fn new(dir: &Path) -> anyhow::Result<Frozen> {
        run("fsfreeze", &["-f", dir.to_str().context("path")?])?;
        Ok(Frozen {
            dir: dir.to_owned(),
            frozen: true,
        })
    }

    /// Thaw now, reporting errors.
    pub fn thaw(mut self) -> anyhow::Result<()> {
        self.frozen = false;
        run("fsfreeze", &["-u", self.dir.to_str().context("path")?])
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.frozen
            && let Some(d) = self.dir.to_str()
        {
            let _ = run("fsfreeze", &["-u", d]);
        }
    }
}

/// Empty directories made as mount points for a test (only those that were missing) and
/// removed on drop, so a test that mounts over `/etc/ripcord` in its own namespace leaves
/// no `/etc/ripcord` behind.
pub struct MountPoints(Vec<PathBuf>);

impl MountPoints {
    pub fn make<'a>(dirs: impl IntoIterator<Item = &'a str>) -> anyhow::Result<MountPoints> {
        let mut made = MountPoints(Vec::new());
        for dir in dirs {
            let dir = Path::new(dir);
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("making the mount point {}", dir.display()))?;
                made.0.push(dir.to_owned());
            }
        }
        Ok(made)
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A block-queue limit (`/sys/block/<dev>/queue/<name>`) set for a test and put back on
/// drop, whatever happens: the limit outlives the loop device's attachment, and the next
/// test on the same device number would inherit it.
pub struct QueueLimit {
    path: std::path::PathBuf,
    old: String,
}

impl QueueLimit {
    pub fn set(dev: &Path, name: &str, value: &str) -> anyhow::Result<QueueLimit> {
        let dev_name = dev
            .file_name()
            .with_context(|| format!("{} has no device name", dev.display()))?
            .to_string_lossy()
            .into_owned();
        let path = std::path::PathBuf::from(format!("/sys/block/{dev_name}/queue/{name}"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        let limit = QueueLimit { path, old };
        std::fs::write(&limit.path, value)
            .with_context(|| format!("writing {value} to {}", limit.path.display()))?;
        let now = std::fs::read_to_string(&limit.path)?;
        if now.trim() != value {
            bail!(
                "{} is {} after writing {value}",
                limit.path.display(),
                now.trim()
            );
        }
        Ok(limit)
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!("warning: restoring {}: {e}", self.path.display());
        }
    }
}

/// Read a whole block device or file.
pub fn read_all(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The 512-byte sectors where two equally sized files or devices differ, as merged
/// `(sector, len)` ranges. Streams both, 4 MiB at a time.
pub fn diff_sectors(a: &Path, b: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    use std::io::Read as _;
    let mut fa = std::fs::File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut sector = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        anyhow::ensure!(
            na == nb,
            "{} and {} differ in size",
            a.display(),
            b.display()
        );
        if na == 0 {
            return Ok(out);
        }
        for (x, y) in ba[..na].chunks(512).zip(bb[..nb].chunks(512)) {
            if x != y {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == sector => *l += 1,
                    _ => out.push((sector, 1)),
                }
            }
            sector += 1;
        }
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> anyhow::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}
