//! Digests a device or image and prints one JSON line: `{"bytes":N,"seconds":S,"regions":R,"zero_regions":Z}`.
//! Used by `cargo xtask bench digest` (built in release there); also handy by hand:
//! `cargo run --release -p ripcord-digest --example digest_device -- /dev/loop0`.

use std::{fs::File, time::Instant};

use ripcord_digest::{DEFAULT_REGION_BLOCKS, Detail, DigestKey, DigestMap};

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: digest_device <device or image> [regions]");
    let detail = match std::env::args().nth(2).as_deref() {
        Some("regions") => Detail::Regions,
        _ => Detail::Blocks,
    };
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // The size of a block device is where it seeks to at its end; of a file, its length.
    let size = {
        use std::io::Seek as _;
        let mut f = &file;
        f.seek(std::io::SeekFrom::End(0))
            .unwrap_or_else(|e| panic!("sizing {path}: {e}"))
    };
    let key = DigestKey::derive(b"bench secret, not a real key", path.as_bytes());
    let t0 = Instant::now();
    let map = DigestMap::compute(&key, &file, size, DEFAULT_REGION_BLOCKS, detail, |_| {})
        .unwrap_or_else(|e| panic!("digesting {path}: {e}"));
    let seconds = t0.elapsed().as_secs_f64();
    let zero = map.regions().iter().filter(|d| d.is_zero()).count();
    println!(
        "{{\"bytes\":{size},\"seconds\":{seconds},\"regions\":{},\"zero_regions\":{zero}}}",
        map.regions().len()
    );
}
