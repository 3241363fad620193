//! One round over all disks (the steps of the module doc of `pipeline`): drain events up
//! to the instant, read the dirty and in-flight ranges, check them against the write
//! generations, seal and hand batches to the network side, and place a cut when the round
//! was clean and complete.

use super::*;

/// Sort `ranges` and merge those that overlap or lie within [`MERGE_GAP_SECTORS`].
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, l) in ranges {
        if let Some(last) = out.last_mut()
            && s <= last.0 + last.1 + MERGE_GAP_SECTORS
        {
            last.1 = last.1.max(s + l - last.0);
            continue;
        }
        out.push((s, l));
    }
    out
}

/// Run one round over all disks; `send(slot, item)` hands work to the network side
/// (blocking when it is full). Returns whether any data was read or sent.
pub fn round(
    capture: &mut Capture,
    disks: &mut [DiskProducer],
    cfg: &RoundConfig,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    // 0. What completed so far, then the device's own dirty page cache over what this
    // round will read written back before the instant (`DiskProducer::write_back_page_cache`).
    let round_start = Instant::now();
    capture.drain_events_through_now(|e| {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(&e);
        }
    })?;
    for d in disks.iter_mut() {
        d.write_back_page_cache(cfg);
    }
    // 1. Generations first, then everything completed so far. A group round takes this
    // instant at its target, bracketed by wall-clock readings: the cut is a crash state at
    // the snapshot, which lies between them.
    let mut stamp = None;
    if let CutRequest::Group(target) = cfg.cut {
        wait_until_wall(if target.app {
            target.local_ns.saturating_add(target.error_at_instant())
        } else {
            target.local_ns
        });
    }
    let before = now_wall_ns();
    let snap = capture.gen_snapshot();
    let frozen_at_snapshot = cfg.frozen_until.is_some_and(|until| Instant::now() < until);
    let t_mono = now_mono_ns();
    let t_wall = now_wall_ns();
    let app = match cfg.cut {
        CutRequest::App => true,
        CutRequest::Group(target) => target.app,
        CutRequest::Interval | CutRequest::Forced => false,
    };
    if let CutRequest::Group(target) = cfg.cut {
        // |cut − instant| ≤ (after − target) + the offset's error (decision 0027); under a
        // freeze that spans the instant, the offset's error alone (decision 0028). The
        // offset's error grew by the drift since the target was handed out; a wall clock
        // stepped since voids the target.
        let late = if app {
            0
        } else {
            t_wall.saturating_sub(target.local_ns.min(before))
        };
        let offset_error = target.clock_at(t_wall, t_mono);
        if offset_error.is_none() {
            tracing::warn!(
                instant_ns = target.stamp.instant_ns,
                "the wall clock was stepped while a group cut waited for its instant: not \
                 stamped"
            );
        }
        let error_ns = offset_error.map_or(u64::MAX, |e| e.saturating_add(late));
        if error_ns <= target.max_error_ns {
            stamp = Some(ripcord_proto::GroupStamp {
                error_ns,
                ..target.stamp
            });
        } else {
            tracing::debug!(
                instant_ns = target.stamp.instant_ns,
                error_us = error_ns / 1000,
                limit_us = target.max_error_ns / 1000,
                "group cut not stamped: its clock error passes half the group's limit"
            );
        }
    }
    for d in disks.iter_mut() {
        d.read_log.forget_old(t_mono);
    }
    let mut drained_all = capture.drain_events_through_now(|e| {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(&e);
        }
    })?;
    // 2. The in-flight walk, then the reports committed before it ended. Other events of
    // that drain completed after T: they belong to the next round.
    let inflight = capture.inflight();
    let mut later: Vec<agent_common::ChangeEvent> = Vec::new();
    drained_all &= capture.drain_events_through_now(|e| {
        if e.op & op::LOST != 0 {
            if let Some(d) = disks.get_mut(e.slot as usize) {
                d.note(&e);
            }
        } else {
            later.push(e);
        }
    })?;
    // Writes in flight for too long were completed without the completion probe running
    // (or are stuck): report them once and read them back.
    for lost in capture.stalled_in(&inflight, LOST_AFTER) {
        for (slot, sector, sectors) in lost.ranges {
            if let Some(d) = disks.get_mut(slot) {
                tracing::warn!(
                    device = %d.dev.path.display(),
                    sector,
                    sectors,
                    "a queued write's completion was never reported: reading the range back"
                );
                d.counters.lost_completions += 1;
                d.zeroed.remove(sector, sectors);
                d.dirty.insert(sector, sectors);
            }
        }
    }
    let mut inflight_ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); disks.len()];
    for (slot, sector, sectors) in capture.inflight_ranges(&inflight) {
        if let Some(r) = inflight_ranges.get_mut(slot) {
            r.push((sector, sectors));
        }
    }

    // 3. Read phase, every disk.
    let read_start = Instant::now();
    for d in disks.iter_mut() {
        d.counters.drain_us += (read_start - round_start).as_micros() as u64;
    }
    let buf_bytes = (cfg.round_sectors * 512) as usize + crate::replicate::readback::MAX_READ;
    for (slot, d) in disks.iter_mut().enumerate() {
        let overflow = capture.drain_overflow(slot);
        d.counters.dropped = capture.stats(slot).dropped;
        for (s, l) in overflow.regions.iter() {
            d.dirty.insert(s, l);
        }
        if overflow.missed > 0 {
            d.counters.missed += overflow.missed;
            tracing::warn!(
                device = %d.dev.path.display(),
                missed = overflow.missed,
                "writes capture could not follow (the queue probe was skipped or failed, or \
                 the in-flight map was full): resynchronising the whole device"
            );
        }
        if overflow.passthrough > 0 {
            d.counters.passthrough_writes += overflow.passthrough;
            tracing::warn!(
                device = %d.dev.path.display(),
                requests = overflow.passthrough,
                "a passthrough request sent data to the disk (SG_IO, NVMe or io_uring \
                 passthrough): capture cannot see which sectors it changed, so the whole \
                 device is read again (same epoch; no point until it is read)"
            );
        }
        if overflow.whole_device {
            d.dirty.insert(0, d.dev.sectors);
        }
        d.counters.rounds += 1;
        d.round_clean = true;
        let mut work = d.dirty.take_up_to(cfg.round_sectors);
        d.round_complete = d.dirty.is_empty();
        work.append(&mut inflight_ranges[slot]);
        let work = coalesce(work);
        d.read_phase(capture, &snap, slot, &work, buf_bytes, &mut later)?;
    }
    if capture.raced_anywhere_since(&snap) {
        // A wide write or an unknown one: every piece read may hold newer data.
        for d in disks.iter_mut() {
            d.round_clean = false;
            for &(s, l, _) in &d.pieces {
                d.dirty.insert(s, l);
            }
        }
    }

    // 4. Send phase.
    let send_start = Instant::now();
    let mut worked = false;
    for (slot, d) in disks.iter_mut().enumerate() {
        let oldest = d.oldest_change.take();
        let mut out: Vec<Batch> = Vec::new();
        for (s, l) in d.zeroed.take().iter() {
            if capture.regions_raced_since(&snap, slot, s, l) {
                d.round_clean = false;
            }
            out.extend(d.builder.add_zero(s, l, ExtentKind::Zero)?);
            worked = true;
        }
        if let Some(buf) = &d.round_buf {
            for &(s, l, off) in &d.pieces {
                let data = &buf.as_slice()[off..off + (l * 512) as usize];
                out.extend(d.builder.add(s, data)?);
                worked = true;
            }
        }
        for b in out.drain(..) {
            send_batch(d, slot, b, oldest, send)?;
        }
        if let Some(cursor) = d.sync_cursor {
            let end = (cursor + cfg.sync_chunk_sectors).min(d.dev.sectors);
            for (ps, pl) in d.reader.pieces(cursor, end - cursor) {
                let started = now_mono_ns();
                let data = match d.reader.read(ps, pl) {
                    Ok(data) => data,
                    Err(e) => {
                        d.read_failed(ps, pl, &e);
                        continue;
                    }
                };
                d.read_log.record(ps, pl, started, now_mono_ns());
                d.counters.bytes_read += data.len() as u64;
                if capture.regions_raced_since(&snap, slot, ps, pl) {
                    d.round_clean = false;
                    d.counters.raced_reads += 1;
                    d.dirty.insert(ps, pl);
                }
                match d.delta.clone() {
                    Some(map) => {
                        add_differing(&mut d.builder, &mut d.counters, &map, ps, data, &mut out)?
                    }
                    None => out.extend(d.builder.add(ps, data)?),
                }
                worked = true;
                for b in out.drain(..) {
                    send_batch(d, slot, b, None, send)?;
                }
                d.sync_progress
                    .store(ps + pl, std::sync::atomic::Ordering::Relaxed);
                capture.drain_events(|e| later.push(e))?;
            }
            if capture.raced_anywhere_since(&snap) {
                d.round_clean = false;
                d.dirty.insert(cursor, end - cursor);
            }
            d.sync_cursor = (end < d.dev.sectors).then_some(end);
            if d.sync_cursor.is_none() {
                d.synced_at = Some(Instant::now());
                d.gap_since = d.synced_at;
            }
        }
        if let Some(b) = d.builder.flush()? {
            send_batch(d, slot, b, oldest, send)?;
        }
        d.counters.read_us += (send_start - read_start).as_micros() as u64;
        let clean = d.round_clean && d.round_complete;
        if clean {
            d.counters.clean_rounds += 1;
        }
        let due = cfg.cut != CutRequest::Interval
            || d.last_cut.is_none_or(|t| t.elapsed() >= cfg.cut_interval);
        let wanted = d.uncut || cfg.cut != CutRequest::Interval;
        let placed =
            clean && drained_all && !d.syncing() && wanted && due && (!app || frozen_at_snapshot);
        if matches!(cfg.cut, CutRequest::Group(_)) && !(placed && stamp.is_some()) {
            d.counters.group_misses += 1;
        }
        if placed {
            send(
                slot,
                Outgoing::Cut {
                    time_ns: t_wall,
                    mono_ns: t_mono,
                    seq: d.builder.next_seq() - 1,
                    app,
                    group: stamp,
                },
            )?;
            d.counters.cuts += 1;
            if app {
                d.counters.app_cuts += 1;
            }
            match cfg.cut {
                CutRequest::App => {}
                CutRequest::Forced => d.counters.forced_cuts += 1,
                CutRequest::Group(_) if stamp.is_some() => d.counters.group_cuts += 1,
                CutRequest::Interval | CutRequest::Group(_) => {}
            }
            if let Some(since) = d.gap_since {
                d.largest_gap = d.largest_gap.max(since.elapsed());
            }
            d.uncut = false;
            d.last_cut = Some(Instant::now());
            d.gap_since = None;
        }
    }
    for d in disks.iter_mut() {
        d.counters.send_us += send_start.elapsed().as_micros() as u64;
    }
    for e in &later {
        if let Some(d) = disks.get_mut(e.slot as usize) {
            d.note(e);
        }
    }
    for d in disks.iter_mut().filter(|d| !d.syncing()) {
        if !d.has_pending_changes() {
            d.gap_since = None;
        } else if d.gap_since.is_none() {
            d.gap_since = Some(Instant::now());
        }
    }
    Ok(worked)
}

/// Sleeps until the local wall clock reads `target_ns`: most of the way with the
/// scheduler, the last stretch spinning (a sleep can wake late by the timer slack and a
/// scheduler tick). `bench group` on this 2-core host, one run each: bound medians of
/// 1.2 / 7.0 ms with 2 / 16 members spinning, 1.4 / 9.4 ms sleeping all the way.
fn wait_until_wall(target_ns: u64) {
    const SPIN_NS: u64 = 300_000;
    loop {
        let now = now_wall_ns();
        if now >= target_ns {
            return;
        }
        let left = target_ns - now;
        if left > SPIN_NS {
            std::thread::sleep(Duration::from_nanos(left - SPIN_NS));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// A continued epoch's sync: adds the blocks of `data` (read at `sector`) that the
/// acknowledged-digest map does not vouch the server holds; sectors outside whole 4 KiB
/// blocks always go.
fn add_differing(
    builder: &mut BatchBuilder,
    counters: &mut DiskCounters,
    map: &crate::replicate::acked_map::SharedAckedMap,
    sector: u64,
    data: &[u8],
    out: &mut Vec<Batch>,
) -> anyhow::Result<()> {
    use crate::replicate::acked_map::BLOCK;
    let per_block = BLOCK / 512;
    let sectors = data.len() as u64 / 512;
    let mut s = 0;
    while s < sectors {
        let at = sector + s;
        let bytes_at =
            |from: u64, n: u64| &data[(from * 512) as usize..((from + n) * 512) as usize];
        if !at.is_multiple_of(per_block) || s + per_block > sectors {
            let n = (per_block - at % per_block).min(sectors - s);
            out.extend(builder.add(at, bytes_at(s, n))?);
            s += n;
            continue;
        }
        let block = bytes_at(s, per_block);
        let held = map
            .lock()
            .expect("acked map lock")
            .matches(at / per_block, block)?;
        if held {
            counters.delta_skipped_bytes += BLOCK;
        } else {
            out.extend(builder.add(at, block)?);
        }
        s += per_block;
    }
    Ok(())
}

fn send_batch(
    d: &mut DiskProducer,
    slot: usize,
    b: Batch,
    oldest: Option<u64>,
    send: &mut dyn FnMut(usize, Outgoing) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    d.counters.batches += 1;
    for e in &b.extents {
        let bytes = u64::from(e.sectors) * 512;
        match e.kind {
            ExtentKind::Data => d.counters.data_bytes += bytes,
            _ => d.counters.zero_bytes += bytes,
        }
    }
    d.uncut = true;
    // Its blocks are unknown in the acknowledged-digest map, durably, before it leaves.
    d.builder.sync_intents()?;
    let started = Instant::now();
    let sent = send(slot, Outgoing::Batch(b, oldest));
    d.counters.blocked_us += started.elapsed().as_micros() as u64;
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_overlaps_and_small_gaps_only() {
        assert_eq!(
            coalesce(vec![(100, 8), (0, 8), (8, 8), (40, 8), (200, 8), (204, 2)]),
            vec![(0, 48), (100, 8), (200, 8)]
        );
        assert_eq!(
            coalesce(vec![(0, 8), (8 + MERGE_GAP_SECTORS + 1, 8)]).len(),
            2
        );
        assert!(coalesce(Vec::new()).is_empty());
    }
}
