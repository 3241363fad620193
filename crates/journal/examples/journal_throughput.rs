//! Append throughput: `cargo run --release --example journal_throughput -- DIR ENGINE [TOTAL_MIB] [RECORD_KIB] [SYNC_EVERY]`
//! ENGINE is `sync` or `uring`. DIR is wiped before and after the run.
//! With `BATCH=1` in the environment each group of SYNC_EVERY records is one
//! `append_many` (one vectored write) instead of SYNC_EVERY `append` calls.

use std::time::Instant;

use ripcord_journal::{EngineChoice, Journal, JournalConfig, RecordType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!(
            "usage: throughput DIR sync|uring [TOTAL_MIB=1024] [RECORD_KIB=1024] [SYNC_EVERY=8]"
        );
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let engine = match args[2].as_str() {
        "sync" => EngineChoice::Sync,
        "uring" => EngineChoice::IoUring,
        other => return Err(format!("unknown engine {other}").into()),
    };
    let arg = |i: usize, d: u64| args.get(i).map_or(Ok(d), |s| s.parse::<u64>());
    let total_mib = arg(3, 1024)?;
    let record_kib = arg(4, 1024)?;
    let sync_every = arg(5, 8)?.max(1);

    let _ = std::fs::remove_dir_all(&dir);
    let cfg = JournalConfig {
        engine,
        ..JournalConfig::default()
    };
    let mut j = Journal::open(&dir, cfg)?;
    let mut payload = vec![0u8; (record_kib * 1024) as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in payload.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let records = total_mib * 1024 / record_kib;
    let start = Instant::now();
    if std::env::var_os("BATCH").is_some() {
        let group: Vec<(RecordType, &[u8])> = (0..sync_every)
            .map(|_| (RecordType::Batch, payload.as_slice()))
            .collect();
        let mut left = records;
        while left > 0 {
            let n = left.min(sync_every) as usize;
            j.append_sync(&group[..n])?;
            left -= n as u64;
        }
    } else {
        for i in 0..records {
            j.append(RecordType::Batch, &payload)?;
            if (i + 1) % sync_every == 0 {
                j.sync()?;
            }
        }
    }
    j.sync()?;
    let secs = start.elapsed().as_secs_f64();
    let m = j.metrics();
    println!(
        "engine={:?} batch={} dir={} records={} record_kib={} sync_every={} bytes={} secs={:.3} MiB/s={:.1} syncs={} segments={}",
        m.engine,
        std::env::var_os("BATCH").is_some(),
        dir.display(),
        m.records_appended,
        record_kib,
        sync_every,
        m.bytes_written,
        secs,
        m.bytes_written as f64 / (1024.0 * 1024.0) / secs,
        m.syncs,
        m.segments_created
    );
    drop(j);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
