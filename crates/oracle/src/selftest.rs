//! End-to-end self-test: the real workload on a loop device, and fault injection into
//! synthetic images built from a log.

use std::fs::{File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use crate::block::{BLOCK_SIZE, Stamp, make_block};
use crate::check::{CheckOptions, Class, Report, check_file, check_with};
use crate::error::Error;
use crate::log::{Log, Op, OpKind};
use crate::region::Region;
use crate::rng::Rng;
use crate::sim::{SimOptions, apply, simulate, synthesize_image, version_of};
use crate::workload::{AlignedBuf, WorkloadConfig};

/// Whether we run as root (needed for loop devices).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A loop device attached with `losetup`; detached on drop, even on panic.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device.
    pub fn attach(file: &Path) -> Result<Self, Error> {
        let out = Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(file)
            .output()
            .map_err(|e| Error::io("running losetup", e))?;
        if !out.status.success() {
            return Err(Error::SelfTest(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under `parent` (default: the temp dir).
    pub fn new(parent: Option<&Path>) -> Result<Self, Error> {
        let parent = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let p = parent.join(format!(
            "ripcord-oracle-{}-{:x}",
            std::process::id(),
            crate::rng::random_u64()
        ));
        std::fs::create_dir_all(&p)
            .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `blocks` blocks of `dev` (read with O_DIRECT) to a new file `image`.
pub fn copy_device(dev: &Path, image: &Path, blocks: u64) -> Result<(), Error> {
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| Error::io(format!("opening {}", dev.display()), e))?;
    let mut dst =
        File::create(image).map_err(|e| Error::io(format!("creating {}", image.display()), e))?;
    let mut buf = AlignedBuf::new(1 << 20);
    let mut left = blocks * BLOCK_SIZE as u64;
    while left > 0 {
        let want = (buf.as_mut_slice().len() as u64).min(left) as usize;
        let b = &mut buf.as_mut_slice()[..want];
        src.read_exact(b)
            .map_err(|e| Error::io(format!("reading {}", dev.display()), e))?;
        dst.write_all(b)
            .map_err(|e| Error::io(format!("writing {}", image.display()), e))?;
        left -= want as u64;
    }
    Ok(())
}

/// Self-test parameters.
#[derive(Debug, Clone)]
pub struct SelfTestOptions {
    /// Workload run time on the loop device.
    pub seconds: f64,
    /// Size of the sparse backing file.
    pub device_mib: u64,
    /// Where to put scratch files (default: the temp dir).
    pub dir: Option<PathBuf>,
}

impl Default for SelfTestOptions {
    fn default() -> Self {
        SelfTestOptions {
            seconds: 2.0,
            device_mib: 64,
            dir: None,
        }
    }
}

fn expect(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Error> {
    if cond {
        Ok(())
    } else {
        Err(Error::SelfTest(msg()))
    }
}

/// Runs the real workload on a loop device over a sparse file, copies the device once the
/// workload stopped and checks it at `T = now` (must pass) and at an early `T` (must fail),
/// then runs [`synthetic_suite`] on the real log. Needs root. Returns progress lines.
pub fn device_test(opts: &SelfTestOptions) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let dir = ScratchDir::new(opts.dir.as_deref())?;
    let backing = dir.0.join("disk.img");
    let f = File::create(&backing).map_err(|e| Error::io("creating backing file", e))?;
    f.set_len(opts.device_mib << 20)
        .map_err(|e| Error::io("sizing backing file", e))?;
    drop(f);
    let lo = LoopDevice::attach(&backing)?;
    let total = (opts.device_mib << 20) / BLOCK_SIZE as u64;
    let region = Region {
        start: 16,
        len: total - 32,
    };
    let log_path = dir.0.join("oracle.log");
    let mut cfg = WorkloadConfig::new(&lo.path, &log_path);
    cfg.seconds = opts.seconds;
    cfg.region = Some(region);
    cfg.discard_percent = 5;
    cfg.flush_every = 32;
    cfg.blocks_per_write = 16;
    let stop = AtomicBool::new(false);
    let sum = crate::workload::run(&cfg, &stop)?;
    out.push(format!("workload on {}: {sum}", lo.path.display()));
    expect(
        sum.writes > 100 && sum.discards > 0 && sum.flushes > 0 && sum.errors == 0,
        || format!("workload did too little or failed: {sum}"),
    )?;
    let image = dir.0.join("replica.img");
    copy_device(&lo.path, &image, total)?;
    let t = crate::monotonic_ns();
    let log = Log::open(&log_path)?;
    expect(
        log.ended_cleanly() && log.ops.len() as u64 >= sum.writes,
        || "log incomplete".into(),
    )?;
    let rep = check_file(&image, &log, t, &CheckOptions::default())?;
    expect(rep.passed(), || {
        format!("quiescent image must pass:\n{rep}")
    })?;
    out.push(format!(
        "quiescent copy at T=now: PASS ({} valid, {} zero)",
        rep.count(Class::Valid).total,
        rep.count(Class::Zero).total
    ));
    let early = log.header.start_ns + 1;
    let rep = check_file(&image, &log, early, &CheckOptions::default())?;
    expect(
        !rep.passed() && rep.count(Class::Future).illegal > 0,
        || {
            format!(
                "final image checked at the start of the run must fail with future blocks:\n{rep}"
            )
        },
    )?;
    out.push(format!(
        "same image at T=start: FAIL as expected ({} future blocks)",
        rep.count(Class::Future).total
    ));
    out.extend(synthetic_suite(&log, 7)?);
    Ok(out)
}

fn check_mem(img: &[u8], log: &Log, t: u64) -> Result<Report, Error> {
    check_with(&mut Cursor::new(img), log, t, &CheckOptions::default())
}

/// Per-block op lists (indices into `log.ops`, seq order) for the log's region.
fn per_block(log: &Log) -> Vec<Vec<usize>> {
    let r = log.header.region;
    let mut v = vec![Vec::new(); r.len as usize];
    for (i, op) in log.ops.iter().enumerate() {
        if op.kind != OpKind::Flush {
            for b in op.first_block..op.first_block + op.block_count as u64 {
                v[(b - r.start) as usize].push(i);
            }
        }
    }
    v
}

fn completed_before(op: &Op, t: u64) -> bool {
    op.ok() && op.complete_ns.is_some_and(|c| c < t)
}
fn in_flight(op: &Op, t: u64) -> bool {
    op.submit_ns < t && op.complete_ns.is_none_or(|c| c >= t)
}

/// Expects exactly one illegal block, `block`, of class `class`, named in the report text.
fn expect_flag(name: &str, rep: &Report, block: u64, class: Class) -> Result<String, Error> {
    let b = rep.bad_block(block);
    let text = rep.to_string();
    expect(
        !rep.passed()
            && rep.illegal == 1
            && b.is_some_and(|b| b.class == class)
            && text.contains(&format!("block {block}: {class}")),
        || {
            format!(
                "{name}: expected block {block} flagged {class} (and nothing else), got:\n{text}"
            )
        },
    )?;
    Ok(format!("{name}: block {block} flagged {class}"))
}

/// Builds synthetic images from `log` at several `T` (must pass, also with a random subset
/// of in-flight writes applied) and injects faults (dropped write, reordered pair, bit
/// flips, misdirected, torn, future, foreign block), each of which must be flagged with the
/// right class on the right block. Returns progress lines.
pub fn synthetic_suite(log: &Log, seed: u64) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    let ops = &log.ops;
    expect(ops.len() >= 50, || {
        "log too short for the synthetic suite".into()
    })?;
    let r = log.header.region;
    let pb = per_block(log);
    let writes: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].kind == OpKind::Write)
        .collect();

    // 1. Correct images pass at many T, including T exactly at op boundaries.
    let mut ts: Vec<u64> = (1..=6).map(|k| ops[ops.len() * k / 7].submit_ns).collect();
    for _ in 0..3 {
        let op = &ops[rng.below(ops.len() as u64) as usize];
        ts.push(op.submit_ns);
        ts.extend(op.complete_ns);
        ts.extend(op.complete_ns.map(|c| c + 1));
    }
    ts.push(log.header.start_ns);
    ts.extend(log.end_ns.map(|e| e + 1));
    for &t in &ts {
        let mut img = synthesize_image(log, t);
        let rep = check_mem(&img, log, t)?;
        expect(rep.passed(), || {
            format!("synthetic image at T={t} must pass:\n{rep}")
        })?;
        // Apply a random subset of in-flight writes/discards, block by block.
        let mut applied = 0;
        for op in ops
            .iter()
            .filter(|o| o.kind != OpKind::Flush && in_flight(o, t))
        {
            for b in op.first_block..op.first_block + op.block_count as u64 {
                if rng.percent(50) {
                    apply(&mut img, log, op, b);
                    applied += 1;
                }
            }
        }
        let rep = check_mem(&img, log, t)?;
        expect(rep.passed(), || {
            format!("image at T={t} with {applied} in-flight blocks applied must pass:\n{rep}")
        })?;
    }
    out.push(format!(
        "synthetic images at {} instants pass (with and without in-flight blocks)",
        ts.len()
    ));

    // Mutations at a T in the middle of the run.
    let t = ops[ops.len() / 2].submit_ns + 1;
    let base = synthesize_image(log, t);
    let last_ok = |b: u64, t: u64| {
        pb[(b - r.start) as usize]
            .iter()
            .rev()
            .copied()
            .find(|&i| completed_before(&ops[i], t))
    };
    let quiet = |b: u64, t: u64| {
        !pb[(b - r.start) as usize]
            .iter()
            .any(|&i| in_flight(&ops[i], t))
    };
    // (block, newest completed write W, previous completed write V) with nothing in flight.
    let pair = (r.start..r.end()).find_map(|b| {
        let list = &pb[(b - r.start) as usize];
        let w = last_ok(b, t)?;
        if ops[w].kind != OpKind::Write || !quiet(b, t) {
            return None;
        }
        let v = list
            .iter()
            .rev()
            .copied()
            .find(|&i| ops[i].seq < ops[w].seq && completed_before(&ops[i], t))?;
        (ops[v].kind == OpKind::Write).then_some((b, w, v))
    });
    let Some((b, w, v)) = pair else {
        return Err(Error::SelfTest(
            "no block with two completed writes before the middle T".into(),
        ));
    };
    let off = |b: u64| b as usize * BLOCK_SIZE;

    // (a) dropped write.
    let mut img = base.clone();
    apply(&mut img, log, &ops[v], b);
    out.push(expect_flag(
        "(a) dropped write",
        &check_mem(&img, log, t)?,
        b,
        Class::Stale,
    )?);

    // (b) reordered pair: B present (in flight at T'), earlier-completed A absent.
    // Prefer a block `a` whose previous content is an older write (so it shows as stale),
    // searching from the middle of the run; fall back to a first write (shows as zero).
    let mut found = None;
    let mut fallback = None;
    let mid = writes.len() / 2;
    let order = (mid..writes.len()).chain(0..mid);
    'outer: for k in order {
        let bi = writes[k];
        let bop = &ops[bi];
        if bop.complete_ns.is_none_or(|c| c <= bop.submit_ns) {
            continue;
        }
        let t2 = bop.submit_ns + 1;
        for &ai in writes[k.saturating_sub(200)..k].iter().rev() {
            let aop = &ops[ai];
            if aop.complete_ns.is_none_or(|c| c >= bop.submit_ns) {
                continue;
            }
            for a in aop.first_block..aop.first_block + aop.block_count as u64 {
                if bop.touches(a) || last_ok(a, t2) != Some(ai) || !quiet(a, t2) {
                    continue;
                }
                let has_prev = pb[(a - r.start) as usize].iter().any(|&i| {
                    ops[i].seq < aop.seq
                        && ops[i].kind == OpKind::Write
                        && completed_before(&ops[i], t2)
                });
                if has_prev {
                    found = Some((ai, bi, a, t2));
                    break 'outer;
                }
                fallback.get_or_insert((ai, bi, a, t2));
            }
        }
    }
    let Some((ai, bi, a, t2)) = found.or(fallback) else {
        return Err(Error::SelfTest("no reorderable pair found".into()));
    };
    let mut img = synthesize_image(log, t2);
    let bblock = ops[bi].first_block;
    apply(&mut img, log, &ops[bi], bblock);
    let prev = pb[(a - r.start) as usize]
        .iter()
        .rev()
        .copied()
        .find(|&i| ops[i].seq < ops[ai].seq && completed_before(&ops[i], t2));
    let want = match prev {
        Some(p) => {
            apply(&mut img, log, &ops[p], a);
            if ops[p].kind == OpKind::Write {
                Class::Stale
            } else {
                Class::Zero
            }
        }
        None => {
            img[off(a)..off(a) + BLOCK_SIZE].fill(0);
            Class::Zero
        }
    };
    let rep = check_mem(&img, log, t2)?;
    let line = expect_flag("(b) reordered pair", &rep, a, want)?;
    out.push(format!(
        "{line} (seq {} completed before seq {} on block {bblock} was submitted; only the latter present)",
        ops[ai].seq, ops[bi].seq
    ));

    // (c) bit flips: in the filler and in the magic.
    let mut img = base.clone();
    img[off(b) + 1000] ^= 0x10;
    out.push(expect_flag(
        "(c) bit flip in filler",
        &check_mem(&img, log, t)?,
        b,
        Class::Corrupt,
    )?);
    let mut img = base.clone();
    img[off(b) + 3] ^= 0x01;
    out.push(expect_flag(
        "(c) bit flip in magic",
        &check_mem(&img, log, t)?,
        b,
        Class::Corrupt,
    )?);

    // (d) misdirected: another stamped block's content copied over b.
    let x = (r.start..r.end())
        .find(|&x| x != b && base[off(x)..off(x) + 8] == crate::block::MAGIC)
        .ok_or_else(|| Error::SelfTest("no second stamped block".into()))?;
    let mut img = base.clone();
    img.copy_within(off(x)..off(x) + BLOCK_SIZE, off(b));
    out.push(expect_flag(
        "(d) misdirected",
        &check_mem(&img, log, t)?,
        b,
        Class::Misdirected,
    )?);

    // (e) torn: first half newest version, second half previous version; and half zero.
    let mut img = base.clone();
    let old = version_of(log, &ops[v], b);
    img[off(b) + 2048..off(b) + BLOCK_SIZE].copy_from_slice(&old[2048..]);
    out.push(expect_flag(
        "(e) torn (two versions)",
        &check_mem(&img, log, t)?,
        b,
        Class::Torn,
    )?);
    let mut img = base.clone();
    img[off(b)..off(b) + 1024].fill(0);
    out.push(expect_flag(
        "(e) torn (zero head)",
        &check_mem(&img, log, t)?,
        b,
        Class::Torn,
    )?);

    // (f) future: a write submitted at or after T.
    let f = writes
        .iter()
        .copied()
        .find(|&i| ops[i].submit_ns >= t)
        .ok_or_else(|| Error::SelfTest("no write after the middle T".into()))?;
    let mut img = base.clone();
    let fb = ops[f].first_block;
    apply(&mut img, log, &ops[f], fb);
    out.push(expect_flag(
        "(f) future write",
        &check_mem(&img, log, t)?,
        fb,
        Class::Future,
    )?);
    // Boundary: at T == submit_ns the write is not yet in flight.
    let tf = ops[f].submit_ns;
    let mut img = synthesize_image(log, tf);
    apply(&mut img, log, &ops[f], fb);
    out.push(expect_flag(
        "(f) write at T == submit",
        &check_mem(&img, log, tf)?,
        fb,
        Class::Future,
    )?);

    // (g) foreign: same lba and seq, other run id.
    let mut img = base.clone();
    let st = Stamp {
        run_id: log.header.run_id ^ 1,
        lba: b,
        seq: ops[w].seq,
        index: (b - ops[w].first_block) as u32,
    };
    img[off(b)..off(b) + BLOCK_SIZE].copy_from_slice(&make_block(&st));
    out.push(expect_flag(
        "(g) foreign run",
        &check_mem(&img, log, t)?,
        b,
        Class::Foreign,
    )?);
    Ok(out)
}

/// Runs the synthetic suite on simulated logs, and the device test if `device` is true.
pub fn run_all(opts: &SelfTestOptions, device: bool) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for seed in 1..=3 {
        let so = SimOptions {
            seed,
            region: Region { start: 8, len: 512 },
            ops: 4000,
            ..Default::default()
        };
        let log = Log::from_bytes(&simulate(&so)).map_err(|source| Error::Log {
            path: "<simulated>".into(),
            source,
        })?;
        out.push(format!("simulated log seed {seed}: {} ops", log.ops.len()));
        out.extend(synthetic_suite(&log, seed)?);
    }
    if device {
        out.extend(device_test(opts)?);
    }
    Ok(out)
}
