//! The bodies of ripcord's fuzz targets: one function per decoder and file format, each
//! taking hostile bytes to the real decoder (with the size bounds it applies) and, where
//! the format has an encoder, checking that what decodes re-encodes to the same value
//! (or the same bytes, where the encoding is canonical). A body panics only when such a
//! property fails, or when the decoder itself panics.
//!
//! Two callers: the cargo-fuzz harness in `fuzz/` (one thin `fuzz_targets/<name>.rs`
//! per entry of [`TARGETS`], run by `cargo xtask fuzz`), and `tests/corpus.rs`, which
//! replays every file of `fuzz/corpus/<name>/` under `cargo test`. Seeds are written by
//! `seeds::write_corpus` (see `tests/corpus.rs`).

use std::{
    cell::{Cell, RefCell},
    path::Path,
};

mod files;
mod journal;
pub mod seeds;
mod store;
mod wire;

pub use files::{
    agent_config, agent_state, machine_store, mt_state, ps_config, ps_registry, token_store,
};
pub use journal::{journal_entry, journal_record, journal_segment};
pub use store::{
    DISK, catalog, checkpoint, epoch, gc_marker, index_segment, object_names, pack, pack_record,
};
pub use wire::{
    control_message, handshake, register_request, register_response, wire_frame, wire_stream,
};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target, by the name of its harness binary and corpus directory.
pub const TARGETS: &[(&str, Body)] = &[
    ("wire_frame", wire_frame),
    ("wire_stream", wire_stream),
    ("handshake", handshake),
    ("register_request", register_request),
    ("register_response", register_response),
    ("control_message", control_message),
    ("journal_record", journal_record),
    ("journal_segment", journal_segment),
    ("journal_entry", journal_entry),
    ("pack_record", pack_record),
    ("pack", pack),
    ("index_segment", index_segment),
    ("checkpoint", checkpoint),
    ("catalog", catalog),
    ("epoch", epoch),
    ("gc_marker", gc_marker),
    ("object_names", object_names),
    ("digest_slice", digest_slice),
    ("digest_map", digest_map),
    ("change_event", change_event),
    ("btf", btf),
    ("agent_config", agent_config),
    ("agent_state", agent_state),
    ("ps_config", ps_config),
    ("ps_registry", ps_registry),
    ("mt_state", mt_state),
    ("token_store", token_store),
    ("machine_store", machine_store),
];

/// The body of the target named `name`.
pub fn target(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// Runs target `f` on `data`; true if its decoder accepted the input (what the corpus
/// test wants of every `valid-*` seed).
pub fn accepts(f: Body, data: &[u8]) -> bool {
    ACCEPTED.with(|a| a.set(false));
    f(data);
    ACCEPTED.with(Cell::get)
}

/// Called by a target when its decoder accepted the input.
fn accepted() {
    ACCEPTED.with(|a| a.set(true));
}

thread_local! {
    static ACCEPTED: Cell<bool> = const { Cell::new(false) };
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Runs `f` in an empty scratch directory of this thread (on tmpfs where there is one:
/// file targets run thousands of times a second), emptied again afterwards.
fn scratch(f: impl FnOnce(&Path)) {
    SCRATCH.with(|cell| {
        let mut cell = cell.borrow_mut();
        let dir = cell.get_or_insert_with(|| {
            let shm = Path::new("/dev/shm");
            let b = tempfile::Builder::new()
                .prefix("ripcord-fuzz-")
                .tempdir_in(if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                });
            b.expect("creating a scratch directory")
        });
        let path = dir.path().to_path_buf();
        clear(&path);
        f(&path);
        clear(&path);
    });
}

fn clear(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("reading the scratch directory") {
        let p = e.expect("a scratch entry").path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// A run of block or region digests (`DigestSlice::decode`, bounded to the frame
/// maximum): it re-encodes to the same bytes.
pub fn digest_slice(data: &[u8]) {
    use ripcord_digest::{DigestSlice, codec::MAX_FRAME_DIGESTS};
    let Ok((slice, used)) = DigestSlice::decode(data, MAX_FRAME_DIGESTS) else {
        return;
    };
    crate::accepted();
    assert_eq!(slice.encode()[..], data[..used], "re-encoding differs");
}

/// A whole digest map (`DigestMap::decode`, at most 2^20 digests): it re-encodes to a
/// map that decodes the same.
pub fn digest_map(data: &[u8]) {
    use ripcord_digest::DigestMap;
    let Ok(map) = DigestMap::decode(data, 1 << 20) else {
        return;
    };
    crate::accepted();
    let again = DigestMap::decode(&map.encode(), 1 << 20).expect("a re-encoded map decodes");
    assert_eq!(again, map);
}

/// A ring-buffer record from the BPF programs (`event::decode`): an accepted event is
/// its 40 bytes, field by field.
pub fn change_event(data: &[u8]) {
    let Ok(e) = ripcord_agent::event::decode(data) else {
        return;
    };
    crate::accepted();
    let _ = ripcord_agent::event::op_name(e.op);
    let mut b = Vec::with_capacity(agent_common::CHANGE_EVENT_SIZE);
    b.extend_from_slice(&e.time_ns.to_le_bytes());
    b.extend_from_slice(&e.seq.to_le_bytes());
    b.extend_from_slice(&e.sector.to_le_bytes());
    b.extend_from_slice(&e.sectors.to_le_bytes());
    b.extend_from_slice(&e.slot.to_le_bytes());
    b.extend_from_slice(&e.op.to_le_bytes());
    b.extend_from_slice(&e.error.to_le_bytes());
    assert_eq!(b, data);
}

/// Kernel BTF (`btf::Btf::parse`), then the block-layer lookups the agent makes in it
/// (`btf::block_layout`): errors, never panics.
pub fn btf(data: &[u8]) {
    if let Ok(b) = ripcord_agent::btf::Btf::parse(data) {
        crate::accepted();
        let _ = ripcord_agent::btf::block_layout(&b);
    }
}
