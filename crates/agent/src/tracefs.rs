//! Tracepoint field offsets from tracefs `format` files.
//!
//! The BPF programs read tracepoint records at offsets given to them at load time, so one
//! object works across kernels whose record layouts differ.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// Places tracefs is usually mounted.
const MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Why the tracepoint layout could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in {MOUNTS:?}); mount it with \
         `mount -t tracefs tracefs /sys/kernel/tracing` (or run `cargo xtask setup`)"
    )]
    NotMounted,
    #[error("{path}: {source} (does this kernel have the block tracepoints?)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tracepoint}: field `{field}` is missing from the format file")]
    MissingField { tracepoint: String, field: String },
    #[error("{tracepoint}: field `{field}` has size {size}, expected {expected}")]
    FieldSize {
        tracepoint: String,
        field: String,
        size: u32,
        expected: &'static str,
    },
}

/// The tracefs mount point, if mounted.
pub fn mount_point() -> Result<PathBuf, TracefsError> {
    MOUNTS
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .map(Path::to_owned)
        .ok_or(TracefsError::NotMounted)
}

/// Parse a tracefs `format` file into field name -> offset and size.
///
/// Lines look like `\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;`.
/// Arrays keep their base name (`rwbs[10]` -> `rwbs`).
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_owned(), Field { offset, size });
    }
    fields
}

/// The fields of one tracepoint, read from its format file.
pub struct Format {
    pub tracepoint: String,
    fields: HashMap<String, Field>,
}

impl Format {
    /// Read `events/<category>/<name>/format` under the tracefs mount.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Format::from_text(&format!("{category}:{name}"), &text))
    }

    pub fn from_text(tracepoint: &str, text: &str) -> Format {
        Format {
            tracepoint: tracepoint.to_owned(),
            fields: parse_format(text),
        }
    }

    /// The offset of `field`, checking its size is one of `sizes` (in bytes).
    pub fn offset(
        &self,
        field: &str,
        sizes: &[u32],
        expected: &'static str,
    ) -> Result<u32, TracefsError> {
        let f = self
            .fields
            .get(field)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: field.to_owned(),
            })?;
        if !sizes.contains(&f.size) {
            return Err(TracefsError::FieldSize {
                tracepoint: self.tracepoint.clone(),
                field: field.to_owned(),
                size: f.size,
                expected,
            });
        }
        Ok(f.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RQ_COMPLETE: &str = "name: block_rq_complete
ID: 2107
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u\", REC->dev
";

    #[test]
    fn parses_a_real_format_file() {
        let f = Format::from_text("block:block_rq_complete", RQ_COMPLETE);
        assert_eq!(f.offset("dev", &[4], "4").unwrap(), 8);
        assert_eq!(f.offset("sector", &[8], "8").unwrap(), 16);
        assert_eq!(f.offset("nr_sector", &[4], "4").unwrap(), 24);
        assert_eq!(f.offset("error", &[4], "4").unwrap(), 28);
        assert_eq!(f.offset("rwbs", &[8, 9, 10], "8..10").unwrap(), 34);
        assert_eq!(f.offset("cmd", &[4], "4").unwrap(), 44);
    }

    #[test]
    fn missing_and_wrong_sized_fields_are_named() {
        let f = Format::from_text("block:block_rq_complete", RQ_COMPLETE);
        let e = f.offset("bytes", &[4], "4").unwrap_err().to_string();
        assert!(
            e.contains("block:block_rq_complete") && e.contains("bytes"),
            "{e}"
        );
        let e = f.offset("sector", &[4], "4").unwrap_err().to_string();
        assert!(e.contains("size 8"), "{e}");
    }

    #[test]
    fn ignores_garbage() {
        assert!(parse_format("field:int;offset:x;size:4;\n\0\0garbage\n").is_empty());
    }
}
