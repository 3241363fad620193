//! Lying bytes in the target store (issue 17, item 5). Every object of a signed store (the
//! escrow file, the epoch, packs, index segments, the checkpoint, catalog objects) is
//! damaged in turn, the way a failing disk or someone who can write the bucket would
//! damage it: single bit flips at seeded random offsets, a truncation, an emptied object.
//! For every damage and every recovery point, `ripcord failover` either restores exactly
//! the point's image (the flip landed in bytes that point does not read) or fails, leaves
//! no image, and names the damaged object. Nothing damaged is ever restored as data.
//!
//! The offsets come from a seeded RNG (the seed is printed; `RIPCORD_LYING_SEED` replays
//! a run).

mod common;

use std::path::{Path, PathBuf};

use common::{EPOCH, Fixture, RunRipcord as _, assert_image, output_text};
use rand::{RngExt as _, SeedableRng as _};

/// Bit flips per object.
const FLIPS: usize = 6;

/// Every object of the store, relative to its root.
fn objects(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("listing the store") {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(root, &mut files);
    let mut names: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The name an error message should use for `object`: its file name (messages name
/// objects by their store path, which ends with it).
fn short_name(object: &str) -> &str {
    object.rsplit('/').next().unwrap_or(object)
}

#[tokio::test]
async fn damaged_objects_are_found_named_and_never_restored_as_data() {
    let f = Fixture::new().await;
    let seed = std::env::var("RIPCORD_LYING_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("damage seed: {seed} (replay with RIPCORD_LYING_SEED={seed})");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let objects = objects(&f.root());
    for kind in [
        "escrow",
        "epochs/",
        "packs/",
        "index/",
        "checkpoints/",
        "catalog/",
        "keys/",
    ] {
        assert!(
            objects.iter().any(|o| o.contains(kind)),
            "the fixture has no {kind} object to damage: {objects:?}"
        );
    }
    let points: Vec<String> = (1..=f.images.len())
        .map(|c| format!("{EPOCH}-{c}"))
        .collect();
    let (mut restored, mut refused) = (0, 0);
    for object in &objects {
        let good = f.read(object);
        let mut damages: Vec<(String, Vec<u8>)> = (0..FLIPS)
            .map(|_| {
                let bit = rng.random_range(0..good.len() * 8);
                let mut bad = good.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                (format!("bit {bit} flipped"), bad)
            })
            .collect();
        let cut = rng.random_range(0..good.len());
        damages.push((format!("truncated to {cut} bytes"), good[..cut].to_vec()));
        damages.push(("emptied".to_owned(), Vec::new()));
        for (damage, bad) in damages {
            f.write(object, bad);
            for (point, image) in points.iter().zip(&f.images) {
                let (out, img) = f.failover(point);
                let text = output_text(&out);
                if out.status.success() {
                    // Only bytes this point does not depend on were damaged.
                    assert_image(&img, image);
                    std::fs::remove_file(&img).expect("removing the image");
                    restored += 1;
                    continue;
                }
                refused += 1;
                assert!(
                    !img.exists(),
                    "{object} {damage}: a refused failover of {point} left an image"
                );
                assert!(
                    text.contains(short_name(object)),
                    "{object} {damage}: failover of {point} failed without naming the \
                     damaged object:\n{text}"
                );
            }
            f.write(object, good.clone());
        }
    }
    eprintln!(
        "{} objects damaged {} ways each: {refused} failovers refused naming the object, \
         {restored} restored exactly (damage in bytes the point does not read)",
        objects.len(),
        FLIPS + 2
    );
    assert!(refused > 0, "no damage was ever noticed");
}
