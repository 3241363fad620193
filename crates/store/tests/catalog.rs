//! The compacted catalog: points survive compaction verbatim, a crash between a merge and
//! deleting its inputs lists each point once, retention follows the writer's clock,
//! hostile segments are refused by name, and format-2 `.cut` stores still list.
mod common;
use common::*;
use object_store::ObjectStoreExt as _;
use ripcord_store::testing::{CountingStore, Faults, FaultyStore};
use ripcord_store::*;
use std::sync::Arc;
use std::time::SystemTime;

/// The writer's clock at flush `i` (unrelated to the agent's times on purpose).
fn server(i: u64) -> u64 {
    5_000_000_000_000_000_000 + i * 1_000_000_000
}

/// A cut whose agent time runs *backwards* against the server clock, so that a
/// retention on the agent's time would pick the opposite points. Even cut ids are members
/// of a consistency group's points (stamped), odd ones are not, so every test here also
/// checks that stamps come back exactly.
fn skewed_cut(cut_id: u64, seq: u64) -> CutInfo {
    CutInfo {
        time_ns: T0 + 1_000_000_000_000 - cut_id * 1_000_000,
        group: cut_id.is_multiple_of(2).then(|| stamp(cut_id)),
        ..cut(1, cut_id, seq)
    }
}

/// The group stamp of cut `cut_id` (every field differs per cut).
fn stamp(cut_id: u64) -> GroupStamp {
    GroupStamp {
        group: GroupId([0x6b; 16]),
        instant_ns: 60_000_000_000 * cut_id,
        members: (cut_id % 7 + 1) as u16,
        offset_ns: -(cut_id as i64) * 1_000,
        error_ns: 1_000_000 + cut_id,
    }
}

/// Writes `flushes` flushes of epoch 1, each one batch and `per` cuts, flush `i` at
/// `server(i)`. Returns every cut with its commit time.
async fn write_flushes(store: &Store, flushes: u64, per: u64) -> Vec<(CutInfo, u64)> {
    let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
    w.begin_epoch(&epoch_info(1)).await.unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let mut out = Vec::new();
    let mut cut_id = w.last_cut_id();
    for i in 1..=flushes {
        let seq = w.next_seq();
        w.add_batch(gen_batch(&mut rng, 1, seq)).await.unwrap();
        for _ in 0..per {
            cut_id += 1;
            let c = skewed_cut(cut_id, seq);
            assert!(w.add_cut(c).unwrap());
            out.push((c, server(i)));
        }
        w.flush_at(server(i)).await.unwrap();
    }
    out
}

async fn catalog_objects(os: &Arc<dyn object_store::ObjectStore>) -> Vec<format::CatName> {
    names(os, &format!("{}/catalog", disk_dir()))
        .await
        .into_iter()
        .filter_map(|(n, _)| format::parse_catalog(&n))
        .collect()
}

fn assert_listed(pts: &[RecoveryPoint], written: &[(CutInfo, u64)], what: &str) {
    assert_eq!(pts.len(), written.len(), "{what}: each point listed once");
    let mut got: Vec<(CutInfo, u64)> = pts.iter().map(|p| (p.cut(), p.committed_ns)).collect();
    got.sort_by_key(|(c, _)| c.cut_id);
    assert_eq!(got, written, "{what}: points (with MACs) differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_written_over_many_flushes_come_back_identical_after_compaction() {
    for (name, os, _dir) in backends() {
        let counting = Arc::new(CountingStore::new(os.clone()));
        let store = Store::new(counting.clone(), "");
        let written = write_flushes(&store, 300, 3).await;
        let objs = catalog_objects(&os).await;
        let levels = objs.iter().map(|n| n.level).max().unwrap();
        assert!(levels >= 2, "{name}: 300 flushes reach level 2: {objs:?}");
        for l in 0..=levels {
            let at = objs.iter().filter(|n| n.level == l).count();
            assert!(at < CATALOG_FANOUT, "{name}: {at} segments at level {l}");
        }
        assert!(objs.iter().all(|n| !n.legacy), "{name}: no .cut is written");
        assert_listed(&store.points(&DISK).await.unwrap(), &written, name);

        // The latest point costs one listing and one segment.
        counting.counts.reset();
        let latest = store.latest_point(&DISK).await.unwrap().unwrap();
        assert_eq!(latest.cut(), written.last().unwrap().0, "{name}");
        let (gets, _, lists, _) = counting.counts.snapshot();
        assert_eq!((gets, lists), (1, 1), "{name}: latest reads one segment");
        let app = store
            .latest_point_where(&DISK, |p| p.kind == CutKind::App)
            .await
            .unwrap()
            .unwrap();
        let want = written.iter().rev().find(|(c, _)| c.kind == CutKind::App);
        assert_eq!(app.cut(), want.unwrap().0, "{name}");
        for (c, t) in [&written[0], &written[450], &written[899]] {
            let p = store
                .point_by_id(&DISK, 1, c.cut_id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!((p.cut(), p.committed_ns), (*c, *t), "{name}");
            assert!(p.catalog_object.contains("/catalog/"), "{name}");
        }
        assert!(store.point_by_id(&DISK, 1, 901).await.unwrap().is_none());
        let p = store.points(&DISK).await.unwrap().pop().unwrap();
        assert!(store.resolve(&DISK, &p).await.is_ok(), "{name}");
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert!(v.is_ok() && v.points_checked == 900, "{name}: {v:?}");

        // A reopened writer learns its newest cut from the names alone.
        let w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        assert_eq!(w.last_cut_id(), 900, "{name}");
    }
}

#[tokio::test]
async fn a_crash_between_writing_a_merged_segment_and_deleting_its_inputs_lists_each_point_once() {
    for (name, os, _dir) in backends() {
        let faulty = Arc::new(FaultyStore::new(os.clone()));
        let store = Store::new(faulty.clone(), "");
        let mut written = write_flushes(&store, CATALOG_FANOUT as u64 - 1, 2).await;
        assert_eq!(catalog_objects(&os).await.len(), CATALOG_FANOUT - 1);
        // The flush that fills level 0 merges it; the merged segment is stored, then the
        // "crash": no input is deleted.
        faulty.set(Faults {
            fail_deletes_containing: Some("/catalog/".into()),
            ..Faults::default()
        });
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
        let seq = w.next_seq();
        w.add_batch(gen_batch(&mut rng, 1, seq)).await.unwrap();
        let c = skewed_cut(w.last_cut_id() + 1, seq);
        w.add_cut(c).unwrap();
        written.push((c, server(99)));
        let committed = w.flush_at(server(99)).await.unwrap();
        assert_eq!(
            committed.cuts_committed,
            vec![c.cut_id],
            "{name}: flush succeeds"
        );
        let objs = catalog_objects(&os).await;
        assert_eq!(
            objs.len(),
            CATALOG_FANOUT + 1,
            "{name}: inputs and merge: {objs:?}"
        );
        let merged: Vec<_> = objs.iter().filter(|n| n.level == 1).collect();
        assert_eq!(
            (merged.len(), merged[0].first, merged[0].last),
            (1, 1, c.cut_id)
        );

        assert_listed(&store.points(&DISK).await.unwrap(), &written, name);
        assert_eq!(store.latest_point(&DISK).await.unwrap().unwrap().cut(), c);
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert!(
            v.is_ok() && v.points_checked == written.len() as u64,
            "{name}: {v:?}"
        );
        // Retention over the overlap expires every copy and keeps the newest once.
        faulty.set(Faults::default());
        let r = store
            .apply_retention_with(&DISK, server(5), &GcConfig::default(), SystemTime::now())
            .await
            .unwrap();
        let keep: Vec<_> = written
            .iter()
            .filter(|(_, t)| *t >= server(5))
            .copied()
            .collect();
        assert_eq!(r.points_expired.len(), written.len() - keep.len(), "{name}");
        assert_listed(&store.points(&DISK).await.unwrap(), &keep, name);
    }
}

#[tokio::test]
async fn retention_uses_the_writers_commit_time_rewrites_segments_and_keeps_the_newest() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os.clone(), "");
        // 20 flushes of 4 cuts: one level-1 segment (flushes 1..=16) and 4 at level 0.
        let written = write_flushes(&store, 20, 4).await;
        let before = catalog_objects(&os).await;
        assert_eq!(before.len(), 5, "{name}: {before:?}");
        // Keep flushes 10.. : the merged segment is rewritten without flushes 1..=9
        // (whose *agent* times are the newest of all).
        let cutoff = server(10);
        let cfg = GcConfig::default();
        let r = store
            .apply_retention_with(&DISK, cutoff, &cfg, SystemTime::now())
            .await
            .unwrap();
        let keep: Vec<_> = written
            .iter()
            .filter(|(_, t)| *t >= cutoff)
            .copied()
            .collect();
        assert_eq!(r.points_expired.len(), 36, "{name}");
        assert_listed(&store.points(&DISK).await.unwrap(), &keep, name);
        let after = catalog_objects(&os).await;
        assert_eq!(after.len(), 5, "{name}: {after:?}");
        let merged = after.iter().find(|n| n.level == 1).unwrap();
        assert_eq!((merged.first, merged.last), (37, 64), "{name}: rewritten");
        assert!(
            !after.contains(&before[0]),
            "{name}: the original is deleted"
        );

        // Whole level-0 segments go; the newest point always stays.
        let r = store
            .apply_retention_with(&DISK, u64::MAX, &cfg, SystemTime::now())
            .await
            .unwrap();
        assert_eq!(r.points_expired.len(), keep.len() - 1, "{name}");
        let newest = *written.last().unwrap();
        assert_listed(&store.points(&DISK).await.unwrap(), &[newest], name);
        let after = catalog_objects(&os).await;
        assert_eq!(after.len(), 1, "{name}: {after:?}");
        assert_eq!((after[0].first, after[0].last), (80, 80), "{name}");

        // An expired entry never comes back: put back the original merged segment (as a
        // compaction racing the retention would have): nothing expired is listed.
        let merged_before = before.iter().find(|n| n.level == 1).unwrap();
        let bytes = format::encode_catalog(
            &DISK,
            1,
            1,
            &written[..64]
                .iter()
                .map(|&(cut, committed_ns)| format::CatalogEntry { cut, committed_ns })
                .collect::<Vec<_>>(),
        );
        os.put(&merged_before.name.as_str().into(), bytes.into())
            .await
            .unwrap();
        assert_listed(&store.points(&DISK).await.unwrap(), &[newest], name);
        assert!(store.verify(Some(&DISK)).await.unwrap().is_ok(), "{name}");
        let w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        assert_eq!(w.last_cut_id(), 80, "{name}");
    }
}

/// The entries of catalog object `n`, read as stored.
async fn stored_entries(
    os: &Arc<dyn object_store::ObjectStore>,
    n: &format::CatName,
) -> Vec<format::CatalogEntry> {
    let b = os.get(&n.name.as_str().into()).await.unwrap();
    format::decode_catalog(&b.bytes().await.unwrap(), &DISK, n).unwrap()
}

#[tokio::test]
async fn group_stamps_survive_a_merge_and_a_retention_rewrite_verbatim() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os.clone(), "");
        // 20 flushes of 4 cuts: flushes 1..=16 merged into one level-1 segment.
        let written = write_flushes(&store, 20, 4).await;
        let stamped = |v: &[format::CatalogEntry]| {
            v.iter()
                .map(|x| (x.cut.cut_id, x.cut.group))
                .collect::<Vec<_>>()
        };
        let want = |ids: std::ops::RangeInclusive<u64>| {
            ids.map(|id| (id, (id % 2 == 0).then(|| stamp(id))))
                .collect::<Vec<_>>()
        };
        let merged = catalog_objects(&os)
            .await
            .into_iter()
            .find(|n| n.level == 1)
            .expect("a merged segment");
        assert_eq!((merged.first, merged.last), (1, 64), "{name}");
        let entries = stored_entries(&os, &merged).await;
        assert_eq!(stamped(&entries), want(1..=64), "{name}: merged");

        store
            .apply_retention_with(&DISK, server(10), &GcConfig::default(), SystemTime::now())
            .await
            .unwrap();
        let rewritten = catalog_objects(&os)
            .await
            .into_iter()
            .find(|n| n.level == 1)
            .expect("the rewritten segment");
        assert_eq!((rewritten.first, rewritten.last), (37, 64), "{name}");
        let entries = stored_entries(&os, &rewritten).await;
        assert_eq!(stamped(&entries), want(37..=64), "{name}: rewritten");
        // Every listed point carries its cut's stamp, through the public reader too.
        let pts = store.points(&DISK).await.unwrap();
        assert_eq!(pts.len(), 44, "{name}");
        for p in &pts {
            let (c, _) = written.iter().find(|(c, _)| c.cut_id == p.cut_id).unwrap();
            assert_eq!((p.group, p.cut()), (c.group, *c), "{name}: {}", p.id);
        }
    }
}

#[tokio::test]
async fn a_hostile_catalog_segment_is_refused_naming_the_object() {
    let os: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let store = Store::new(os.clone(), "");
    write_flushes(&store, 1, 3).await;
    let seg = catalog_objects(&os).await.pop().unwrap();
    let good = os
        .get(&seg.name.as_str().into())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let recrc = |mut b: Vec<u8>| {
        let n = b.len() - 4;
        let c = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
        b
    };
    // Count field (after magic 8, version 4, disk 16, epoch 8, level 1) far larger
    // than the object.
    let mut huge = good.clone();
    huge[37..41].copy_from_slice(&1_000_000u32.to_le_bytes());
    let mut flipped = good.clone();
    flipped[50] ^= 1;
    let renamed = format::catalog_name(&DISK, 1, 2, 3, 0);
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        ("count", seg.name.clone(), recrc(huge), "exceeds the bound"),
        ("crc", seg.name.clone(), flipped, "checksum"),
        ("name", renamed.clone(), good.clone(), "object name"),
    ];
    for (what, name, bytes, expect) in cases {
        let _ = os.delete(&seg.name.as_str().into()).await;
        let _ = os.delete(&renamed.as_str().into()).await;
        os.put(&name.as_str().into(), bytes.into()).await.unwrap();
        let e = store.points(&DISK).await.unwrap_err();
        assert_eq!(e.object(), Some(name.as_str()), "{what}: {e}");
        assert!(e.to_string().contains(expect), "{what}: {e}");
        let v = store.verify(Some(&DISK)).await.unwrap();
        assert_eq!(v.damaged_objects(), vec![name.clone()], "{what}");
        assert!(store.latest_point(&DISK).await.is_err(), "{what}");
    }
}

#[tokio::test]
async fn a_format_2_store_of_one_object_per_cut_still_lists_and_is_folded_by_compaction() {
    for (name, os, _dir) in backends() {
        let store = Store::new(os.clone(), "");
        // Batches through the writer, cuts as format-2 `.cut` objects.
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        w.begin_epoch(&epoch_info(1)).await.unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        for seq in 1..=20 {
            w.add_batch(gen_batch(&mut rng, 1, seq)).await.unwrap();
        }
        w.flush().await.unwrap();
        let mut written = Vec::new();
        for id in 1..=20 {
            let c = cut(1, id, id);
            let n = format::cut_name(&DISK, 1, id);
            os.put(&n.as_str().into(), format::encode_cut(&DISK, &c).into())
                .await
                .unwrap();
            written.push((c, c.time_ns));
        }
        assert_listed(&store.points(&DISK).await.unwrap(), &written, name);
        assert_eq!(
            store.latest_point(&DISK).await.unwrap().unwrap().cut(),
            written[19].0
        );
        let p = store.point_by_id(&DISK, 1, 7).await.unwrap().unwrap();
        assert_eq!(p.catalog_object.as_ref(), format::cut_name(&DISK, 1, 7));
        assert!(store.verify(Some(&DISK)).await.unwrap().is_ok(), "{name}");

        // A reopened writer continues after cut 20; its flush folds 16 `.cut`s.
        let mut w = store.disk_writer(DISK, small_cfg()).await.unwrap();
        assert_eq!((w.last_cut_id(), w.durable_seq()), (20, 20), "{name}");
        w.add_batch(gen_batch(&mut rng, 1, 21)).await.unwrap();
        let c = cut(1, 21, 21);
        w.add_cut(c).unwrap();
        w.flush_at(server(1)).await.unwrap();
        written.push((c, server(1)));
        let objs = catalog_objects(&os).await;
        assert_eq!(
            objs.iter().filter(|n| n.legacy).count(),
            4,
            "{name}: {objs:?}"
        );
        assert_listed(&store.points(&DISK).await.unwrap(), &written, name);
        assert!(store.verify(Some(&DISK)).await.unwrap().is_ok(), "{name}");
    }
}
