//! `ripcord-agent watch`: capture changes on devices and report them.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::{ChangeEvent, op};
use anyhow::Context as _;

use crate::{
    capture::{Capture, CaptureConfig, Overflow},
    device::BlockDevice,
    event::op_name,
    extents::ExtentSet,
    preflight,
};

/// Options of `watch`.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub devices: Vec<PathBuf>,
    /// One JSON line per change on stdout.
    pub json: bool,
    pub capture: CaptureConfig,
    /// Summary interval; `None` for no summary.
    pub summary: Option<Duration>,
    /// Created once the probes are attached.
    pub ready_file: Option<PathBuf>,
    /// Written at exit: a JSON array of per-device counters.
    pub stats_file: Option<PathBuf>,
}

/// How often the overflow bitmaps are folded into the dirty sets.
const OVERFLOW_SCAN: Duration = Duration::from_secs(1);

/// What one protected device has seen.
#[derive(Default)]
struct SlotState {
    dirty: ExtentSet,
    events: u64,
    events_at_last_summary: u64,
    overflow_regions: u64,
}

/// Run until SIGINT or SIGTERM.
pub fn run(opts: &WatchOptions) -> anyhow::Result<()> {
    preflight::require()?;
    let devices = opts
        .devices
        .iter()
        .map(|p| BlockDevice::resolve(p))
        .collect::<Result<Vec<_>, _>>()?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
    }

    let mut capture = Capture::start(&devices, opts.capture)?;
    for d in &devices {
        tracing::info!(
            device = %d.path.display(), dev = %d.dev, disk = %d.disk, start = d.start,
            sectors = d.sectors, "protecting"
        );
    }
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut slots: Vec<SlotState> = devices.iter().map(|_| SlotState::default()).collect();
    let mut last_summary = Instant::now();
    let mut last_overflow_scan = Instant::now();
    // The poll timeout bounds how long an event below the wakeup threshold waits.
    let poll = Duration::from_millis(20);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping {
            // No event after this; then collect everything still in flight.
            capture.detach()?;
        } else {
            capture.wait(poll)?;
        }
        let mut write_err = None;
        let mut take = |e: agent_common::ChangeEvent| {
            let slot = &mut slots[e.slot as usize];
            slot.events += 1;
            if e.op & op::CHANGES_DATA != 0 {
                slot.dirty.insert(e.sector, u64::from(e.sectors));
            }
            if opts.json
                && let Err(err) = write_event(&mut out, &devices[e.slot as usize], &e)
            {
                write_err = Some(err);
            }
        };
        if stopping {
            // The last drain: also wait out records a program was still writing when the
            // probes were detached, so nothing committed before the stop is left behind.
            if !capture.drain_events_through_now(&mut take)? {
                tracing::warn!("a ring record stayed busy at exit; later events may be missing");
            }
        } else {
            capture.drain_events(&mut take)?;
        }
        let summary_due = opts.summary.is_some_and(|i| last_summary.elapsed() >= i);
        if stopping || last_overflow_scan.elapsed() >= OVERFLOW_SCAN {
            last_overflow_scan = Instant::now();
            for (i, slot) in slots.iter_mut().enumerate() {
                let overflow = capture.drain_overflow(i);
                fold_overflow(slot, &devices[i], &overflow);
                if opts.json {
                    write_overflow(&mut out, &devices[i], &overflow)?;
                }
            }
            // Writes whose completion was never reported: their ranges must be re-read. At
            // exit the probes are detached, so every entry left counts.
            let after = if stopping {
                Duration::ZERO
            } else {
                crate::capture::LOST_AFTER
            };
            for lost in capture.stalled(after) {
                for (i, sector, sectors) in lost.ranges {
                    slots[i].dirty.insert(sector, sectors);
                    if opts.json {
                        // As on the probes' lost reports, the time is the write's queue
                        // time; no seq (the agent, not a probe, reports it).
                        let line = serde_json::json!({
                            "dev": devices[i].dev.to_string(),
                            "sector": sector,
                            "sectors": sectors,
                            "op": "lost",
                            "time_ns": lost.id.1,
                        });
                        writeln!(out, "{line}").context("writing to stdout")?;
                    }
                }
            }
        }
        if let Some(err) = write_err {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err).context("writing to stdout");
        }
        out.flush().context("writing to stdout")?;
        if summary_due || (stopping && opts.summary.is_some()) {
            let secs = last_summary.elapsed().as_secs_f64().max(1e-3);
            last_summary = Instant::now();
            for (i, slot) in slots.iter_mut().enumerate() {
                let stats = capture.stats(i);
                eprintln!(
                    "{} ({}): {:.0} events/s, dirty {} in {} extents, drops {}{}",
                    devices[i].name(),
                    devices[i].dev,
                    (slot.events - slot.events_at_last_summary) as f64 / secs,
                    human_bytes(slot.dirty.sectors() * 512),
                    slot.dirty.len(),
                    stats.dropped,
                    if slot.overflow_regions > 0 {
                        format!(" ({} overflow regions to resync)", slot.overflow_regions)
                    } else {
                        String::new()
                    },
                );
                slot.events_at_last_summary = slot.events;
            }
        }
        if stopping {
            for (i, slot) in slots.iter().enumerate() {
                let stats = capture.stats(i);
                if opts.json {
                    let line = serde_json::json!({
                        "dev": devices[i].dev.to_string(),
                        "op": "stats",
                        "events": slot.events,
                        "dropped": stats.dropped,
                        "overflow_all": stats.overflow_all,
                        "missed": capture.missed_completions(),
                        "completion_misses": capture.completion_misses(),
                    });
                    writeln!(out, "{line}").context("writing to stdout")?;
                }
                tracing::info!(
                    device = %devices[i].path.display(),
                    events = slot.events,
                    dropped = capture.stats(i).dropped,
                    dirty_bytes = slot.dirty.sectors() * 512,
                    "stopped"
                );
            }
            out.flush().context("writing to stdout")?;
            if let Some(path) = &opts.stats_file {
                let all: Vec<_> = slots
                    .iter()
                    .enumerate()
                    .map(|(i, slot)| {
                        let stats = capture.stats(i);
                        serde_json::json!({
                            "device": devices[i].path,
                            "dev": devices[i].dev.to_string(),
                            "events": slot.events,
                            "dropped": stats.dropped,
                            "overflow_all": stats.overflow_all,
                            "missed": capture.missed_completions(),
                            "dirty_bytes": slot.dirty.sectors() * 512,
                        })
                    })
                    .collect();
                std::fs::write(path, serde_json::to_vec_pretty(&all)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            return Ok(());
        }
    }
}

fn fold_overflow(slot: &mut SlotState, dev: &BlockDevice, overflow: &Overflow) {
    for (s, l) in overflow.regions.iter() {
        slot.dirty.insert(s, l);
        slot.overflow_regions += 1;
    }
    if overflow.whole_device {
        slot.dirty.insert(0, dev.sectors);
        slot.overflow_regions += 1;
    }
}

fn write_event(
    out: &mut impl std::io::Write,
    dev: &BlockDevice,
    e: &ChangeEvent,
) -> std::io::Result<()> {
    let mut line = serde_json::json!({
        "dev": dev.dev.to_string(),
        "sector": e.sector,
        "sectors": e.sectors,
        "op": op_name(e.op),
        "seq": e.seq,
        "time_ns": e.time_ns,
    });
    if e.op & op::FUA != 0 {
        line["fua"] = true.into();
    }
    if e.op & op::FLUSH != 0 && e.op & op::CHANGES_DATA != 0 {
        line["preflush"] = true.into();
    }
    if e.error != 0 {
        line["error"] = e.error.into();
    }
    writeln!(out, "{line}")
}

fn write_overflow(
    out: &mut impl std::io::Write,
    dev: &BlockDevice,
    o: &Overflow,
) -> anyhow::Result<()> {
    let whole = o.whole_device.then_some((0, dev.sectors));
    for (sector, sectors) in o.regions.iter().chain(whole) {
        let line = serde_json::json!({
            "dev": dev.dev.to_string(),
            "sector": sector,
            "sectors": sectors,
            "op": "overflow",
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Bytes in binary units, e.g. "12.5 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
