//! The progress view of a deploy's wait for initial syncs: a bar per disk on a terminal,
//! else a line each time a disk's state changes (logs and CI stay readable).

use std::{collections::BTreeMap, io::IsTerminal as _};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct SyncView {
    bars: Option<(MultiProgress, BTreeMap<String, ProgressBar>)>,
    shown: BTreeMap<String, String>,
}

impl SyncView {
    pub fn new() -> SyncView {
        SyncView {
            bars: std::io::stderr()
                .is_terminal()
                .then(|| (MultiProgress::new(), BTreeMap::new())),
            shown: BTreeMap::new(),
        }
    }

    /// Disk `key` ("host device") is `percent` through its initial sync, or `done` (synced
    /// with a recovery point acknowledged).
    pub fn show(&mut self, key: &str, percent: u64, done: bool) {
        let line = if done {
            "synced, recovery point acknowledged".to_owned()
        } else {
            format!("initial sync {percent}%")
        };
        if self.shown.get(key) == Some(&line) {
            return;
        }
        match &mut self.bars {
            Some((multi, bars)) => {
                let bar = bars.entry(key.to_owned()).or_insert_with(|| {
                    let style = ProgressStyle::with_template("{prefix:>24} [{bar:40}] {msg}")
                        .expect("literal template")
                        .progress_chars("=> ");
                    multi.add(
                        ProgressBar::new(100)
                            .with_style(style)
                            .with_prefix(key.to_owned()),
                    )
                });
                bar.set_position(if done { 100 } else { percent });
                bar.set_message(line.clone());
                if done {
                    bar.finish();
                }
            }
            None => super::say(&format!("{key}: {line}")),
        }
        self.shown.insert(key.to_owned(), line);
    }
}
