//! The target store's objects (`crates/store/src/format`). Objects checked against
//! their name take it from the input: the first line is the object name, the rest the
//! object's bytes. Every decoder runs with the disk id of the seeds, [`DISK`].
//!
//! Older format versions are read and the current one written, so the property is on
//! values: decode, encode, decode gives the same value.

use ripcord_store::{DiskId, format::*};

/// The disk every store seed belongs to.
pub const DISK: DiskId = DiskId(*b"fuzz-disk-000001");

/// Splits `name\nbytes`.
fn named(data: &[u8]) -> Option<(&str, &[u8])> {
    let nl = data.iter().position(|&b| b == b'\n')?;
    Some((std::str::from_utf8(&data[..nl]).ok()?, &data[nl + 1..]))
}

/// One pack record (`decode_record`, which may be followed by more bytes): it
/// re-encodes to the same bytes, length and checksum.
pub fn pack_record(data: &[u8]) {
    let Ok(r) = decode_record(data) else {
        return;
    };
    crate::accepted();
    let (bytes, crc) = encode_record(r.epoch, r.seq, r.flags, &r.extents, &r.sealed);
    assert_eq!(crc, r.crc);
    assert_eq!(bytes.len() as u64, r.len);
    assert_eq!(
        bytes[..],
        data[..bytes.len()],
        "record re-encodes differently"
    );
}

/// A whole pack (`parse_pack_bytes`: header, records, directory, trailer): it rebuilds
/// from its parsed records to a pack that parses the same.
pub fn pack(data: &[u8]) {
    let Ok(p) = parse_pack_bytes(data, &DISK) else {
        return;
    };
    crate::accepted();
    let mut out = pack_header(&DISK, p.epoch);
    let mut dir = Vec::new();
    for (d, r) in &p.records {
        let (bytes, crc) = encode_record(r.epoch, r.seq, r.flags, &r.extents, &r.sealed);
        dir.push(DirEntry {
            seq: d.seq,
            offset: out.len() as u64,
            length: bytes.len() as u64,
            crc,
        });
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&pack_footer(&dir));
    let again = parse_pack_bytes(&out, &DISK).expect("a rebuilt pack parses");
    assert_eq!(again.epoch, p.epoch);
    assert_eq!(again.records, p.records, "rebuilt pack differs");
}

/// An index segment against its name (`parse_index`, `decode_segment`).
pub fn index_segment(data: &[u8]) {
    let Some((name, buf)) = named(data) else {
        return;
    };
    let Some(name) = parse_index(name) else {
        return;
    };
    let Ok(seg) = decode_segment(buf, &DISK, &name) else {
        return;
    };
    crate::accepted();
    let again = decode_segment(&encode_segment(&DISK, &seg), &DISK, &name)
        .expect("a re-encoded segment decodes");
    assert_eq!(again, seg);
}

/// A checkpoint against its name (`parse_checkpoint`, `decode_checkpoint`).
pub fn checkpoint(data: &[u8]) {
    let Some((name, buf)) = named(data) else {
        return;
    };
    let Some(name) = parse_checkpoint(name) else {
        return;
    };
    let Ok(c) = decode_checkpoint(buf, &DISK, &name) else {
        return;
    };
    crate::accepted();
    let again = decode_checkpoint(&encode_checkpoint(&DISK, &c), &DISK, &name)
        .expect("a re-encoded checkpoint decodes");
    assert_eq!(again, c);
}

/// A catalog object against its name (`parse_catalog`; `decode_catalog` for a `.cat`
/// segment, `decode_cut` for a legacy `.cut`).
pub fn catalog(data: &[u8]) {
    let Some((name, buf)) = named(data) else {
        return;
    };
    let Some(name) = parse_catalog(name) else {
        return;
    };
    if name.legacy {
        let Ok(cut) = decode_cut(buf, &DISK, (name.epoch, name.first)) else {
            return;
        };
        crate::accepted();
        let again = decode_cut(&encode_cut(&DISK, &cut), &DISK, (name.epoch, name.first))
            .expect("a re-encoded cut decodes");
        assert_eq!(again, cut);
        return;
    }
    let Ok(entries) = decode_catalog(buf, &DISK, &name) else {
        return;
    };
    crate::accepted();
    let bytes = encode_catalog(&DISK, name.epoch, name.level, &entries);
    let again = decode_catalog(&bytes, &DISK, &name).expect("a re-encoded catalog decodes");
    assert_eq!(again, entries);
}

/// An epoch description (JSON) against its name (`parse_epoch`, `decode_epoch`).
pub fn epoch(data: &[u8]) {
    let Some((name, buf)) = named(data) else {
        return;
    };
    let Some(epoch) = parse_epoch(name) else {
        return;
    };
    let Ok(info) = decode_epoch(buf, epoch) else {
        return;
    };
    crate::accepted();
    let again = decode_epoch(&encode_epoch(&info), epoch).expect("a re-encoded epoch decodes");
    assert_eq!(again, info);
}

/// A GC pending-delete marker (`decode_pending_delete`).
pub fn gc_marker(data: &[u8]) {
    let Ok(entries) = decode_pending_delete(data) else {
        return;
    };
    crate::accepted();
    let again =
        decode_pending_delete(&encode_pending_delete(&entries)).expect("a re-encoded marker");
    assert_eq!(again, entries);
}

/// Object names, one per line: whatever a `parse_*` accepts, the matching `*_name`
/// writes a name that parses to the same fields.
pub fn object_names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in text.lines() {
        if [
            parse_pack(name).is_some(),
            parse_index(name).is_some(),
            parse_checkpoint(name).is_some(),
            parse_catalog(name).is_some(),
            parse_epoch(name).is_some(),
            parse_pending_delete(name).is_some(),
        ]
        .contains(&true)
        {
            crate::accepted();
        }
        if let Some((e, s)) = parse_pack(name) {
            assert_eq!(parse_pack(&pack_name(&DISK, e, s)), Some((e, s)));
        }
        if let Some(n) = parse_index(name) {
            let again = parse_index(&index_name(&DISK, n.epoch, n.first, n.last, n.generation))
                .expect("a written index name parses");
            let fields = |n: &SegName| (n.epoch, n.first, n.last, n.generation);
            assert_eq!(fields(&again), fields(&n));
        }
        if let Some(n) = parse_checkpoint(name) {
            let again = parse_checkpoint(&checkpoint_name(&DISK, n.epoch, n.seq, n.generation))
                .expect("a written checkpoint name parses");
            assert_eq!(
                (again.epoch, again.seq, again.generation),
                (n.epoch, n.seq, n.generation)
            );
        }
        if let Some((e, c)) = parse_cut(name) {
            assert_eq!(parse_cut(&cut_name(&DISK, e, c)), Some((e, c)));
        }
        if let Some(e) = parse_epoch(name) {
            assert_eq!(parse_epoch(&epoch_name(&DISK, e)), Some(e));
        }
        if let Some(t) = parse_pending_delete(name) {
            assert_eq!(
                parse_pending_delete(&pending_delete_name(&DISK, t)),
                Some(t)
            );
        }
        if let Some(n) = parse_catalog(name)
            && !n.legacy
        {
            let again = parse_catalog(&catalog_name(&DISK, n.epoch, n.first, n.last, n.level))
                .expect("a written catalog name parses");
            let fields = |n: &CatName| (n.epoch, n.first, n.last, n.level, n.legacy);
            assert_eq!(fields(&again), fields(&n));
        }
    }
}
