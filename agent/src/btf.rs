//! Just enough of a BTF reader to find kernel struct member offsets and enum values in
//! `/sys/kernel/btf/vmlinux`, for the raw tracepoint programs (which read `struct request`
//! and `struct bio` fields with `bpf_probe_read_kernel` at offsets set at load time);
//! [`block_layout`] turns what it finds into the programs' `BlockLayout`.
//!
//! Why not a crate: aya parses BTF but keeps type lookup crate-private; `btf-rs` is
//! LGPL-licensed. What is needed here (walk the type section, resolve names) is small; see
//! docs/decisions/0005-raw-tracepoints.md. Every length read from the file is checked
//! against the buffer before use.

use std::{collections::HashMap, path::Path};

use agent_common::BlockLayout;
use anyhow::{Context as _, bail, ensure};

const MAGIC: u16 = 0xeb9f;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One parsed type: its header and where its trailing records start.
#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    /// Offset of the kind-specific records in the type section.
    extra: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

/// Parsed kernel BTF.
pub struct Btf {
    types_sec: Vec<u8>,
    strings: Vec<u8>,
    /// Index 0 is `void`.
    types: Vec<Type>,
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let s = b
        .get(off..off + 4)
        .with_context(|| format!("BTF truncated at byte {off}"))?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> anyhow::Result<Btf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data = std::fs::read(path).with_context(|| {
            format!(
                "reading {}: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y",
                path.display()
            )
        })?;
        Btf::parse(&data).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> anyhow::Result<Btf> {
        ensure!(
            data.len() >= 24,
            "BTF header truncated ({} bytes)",
            data.len()
        );
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#06x})");
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| -> anyhow::Result<Vec<u8>> {
            let start = hdr_len.checked_add(off).context("BTF offset overflow")?;
            let end = start.checked_add(len).context("BTF length overflow")?;
            data.get(start..end)
                .map(<[u8]>::to_vec)
                .with_context(|| format!("BTF {what} section [{start}, {end}) beyond the file"))
        };
        let types_sec = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;
        let mut types = vec![Type {
            name_off: 0,
            info: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut off = 0;
        while off < types_sec.len() {
            let t = Type {
                name_off: u32_at(&types_sec, off)?,
                info: u32_at(&types_sec, off + 4)?,
                size_or_type: u32_at(&types_sec, off + 8)?,
                extra: off + 12,
            };
            let vlen = t.vlen();
            let extra = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                k => bail!("unknown BTF kind {k} at type {}", types.len()),
            };
            off = t.extra + extra;
            ensure!(off <= types_sec.len(), "BTF type {} truncated", types.len());
            types.push(t);
        }
        let mut btf = Btf {
            types_sec,
            strings,
            types,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let t = btf.types[id];
            if t.name_off != 0 {
                let name = btf.string(t.name_off)?.to_owned();
                btf.by_name.entry((t.kind(), name)).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> anyhow::Result<&str> {
        let rest = self
            .strings
            .get(off as usize..)
            .with_context(|| format!("BTF string offset {off} beyond the string section"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .context("unterminated BTF string")?;
        std::str::from_utf8(&rest[..end]).context("BTF string is not UTF-8")
    }

    fn ty(&self, id: u32) -> anyhow::Result<Type> {
        self.types
            .get(id as usize)
            .copied()
            .with_context(|| format!("BTF type id {id} out of range"))
    }

    /// Follow typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> anyhow::Result<Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Ok(t),
            }
        }
        bail!("BTF type chain too long at id {id}")
    }

    /// (name_off, type, bit offset) of each member of a struct or union.
    fn members(&self, t: &Type) -> anyhow::Result<Vec<(u32, u32, u32)>> {
        (0..t.vlen())
            .map(|i| {
                let o = t.extra + 12 * i;
                let raw = u32_at(&self.types_sec, o + 8)?;
                let bits = if t.kind_flag() { raw & 0xff_ffff } else { raw };
                Ok((
                    u32_at(&self.types_sec, o)?,
                    u32_at(&self.types_sec, o + 4)?,
                    bits,
                ))
            })
            .collect()
    }

    /// Byte offset and size of `path` (member names, nested) in `struct name`, looking
    /// through anonymous structs and unions.
    pub fn member(&self, name: &str, path: &[&str]) -> anyhow::Result<(u32, u32)> {
        let id = *self
            .by_name
            .get(&(KIND_STRUCT, name.to_owned()))
            .with_context(|| format!("struct {name} not in the kernel's BTF"))?;
        let mut t = self.ty(id)?;
        let mut offset = 0u32;
        let mut size = t.size_or_type;
        for (depth, field) in path.iter().enumerate() {
            let (bits, member_type) = self.find_member(&t, field, 0)?.with_context(|| {
                format!("struct {name} has no member {}", path[..=depth].join("."))
            })?;
            ensure!(
                bits % 8 == 0,
                "{name}.{} is a bit field",
                path[..=depth].join(".")
            );
            offset += bits / 8;
            t = self.resolve(member_type)?;
            size = match t.kind() {
                KIND_PTR => 8,
                KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => t.size_or_type,
                k => bail!("{name}.{} has unsupported BTF kind {k}", path.join(".")),
            };
        }
        Ok((offset, size))
    }

    /// Bit offset and type of member `field` of `t`, searching anonymous members.
    fn find_member(&self, t: &Type, field: &str, depth: u32) -> anyhow::Result<Option<(u32, u32)>> {
        ensure!(depth < 8, "BTF anonymous members nest too deep");
        if !matches!(t.kind(), KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for (name_off, ty, bits) in self.members(t)? {
            if name_off == 0 {
                let inner = self.resolve(ty)?;
                if let Some((b, found)) = self.find_member(&inner, field, depth + 1)? {
                    return Ok(Some((bits + b, found)));
                }
            } else if self.string(name_off)? == field {
                return Ok(Some((bits, ty)));
            }
        }
        Ok(None)
    }

    /// Value of enumerator `name` (in any enum).
    pub fn enum_value(&self, name: &str) -> anyhow::Result<u64> {
        for t in &self.types[1..] {
            let (rec, kind) = match t.kind() {
                KIND_ENUM => (8, KIND_ENUM),
                KIND_ENUM64 => (12, KIND_ENUM64),
                _ => continue,
            };
            for i in 0..t.vlen() {
                let o = t.extra + rec * i;
                if self.string(u32_at(&self.types_sec, o)?)? != name {
                    continue;
                }
                let lo = u64::from(u32_at(&self.types_sec, o + 4)?);
                return Ok(if kind == KIND_ENUM64 {
                    lo | u64::from(u32_at(&self.types_sec, o + 8)?) << 32
                } else {
                    lo
                });
            }
        }
        bail!("enumerator {name} not in the kernel's BTF")
    }
}

/// The kernel's block-layer offsets and operation codes, from its BTF.
pub fn block_layout(btf: &Btf) -> anyhow::Result<BlockLayout> {
    let field = |st: &str, path: &[&str], size: u32| -> anyhow::Result<u32> {
        let (off, got) = btf.member(st, path)?;
        ensure!(
            got == size,
            "struct {st}.{} is {got} bytes in this kernel, expected {size}",
            path.join(".")
        );
        Ok(off)
    };
    let code = |name: &str| -> anyhow::Result<u32> {
        let v = btf.enum_value(name)?;
        ensure!(
            v <= u64::from(agent_common::REQ_OP_MASK),
            "{name} = {v} does not fit the operation bits"
        );
        Ok(v as u32)
    };
    let bit = |name: &str| -> anyhow::Result<u32> {
        let v = btf.enum_value(name)?;
        ensure!(v < 32, "{name} = {v} is not a bit of a 32-bit blk_opf_t");
        Ok(1 << v)
    };
    let layout = BlockLayout {
        rq_q: field("request", &["q"], 8)?,
        rq_sector: field("request", &["__sector"], 8)?,
        rq_cmd_flags: field("request", &["cmd_flags"], 4)?,
        q_disk: field("request_queue", &["disk"], 8)?,
        disk_major: field("gendisk", &["major"], 4)?,
        disk_first_minor: field("gendisk", &["first_minor"], 4)?,
        bio_bdev: field("bio", &["bi_bdev"], 8)?,
        bio_opf: field("bio", &["bi_opf"], 4)?,
        bio_sector: field("bio", &["bi_iter", "bi_sector"], 8)?,
        bio_size: field("bio", &["bi_iter", "bi_size"], 4)?,
        bdev_disk: field("block_device", &["bd_disk"], 8)?,
        bio_status: field("bio", &["bi_status"], 1)?,
        bio_next: field("bio", &["bi_next"], 8)?,
        rq_bio: field("request", &["bio"], 8)?,
        op_write: code("REQ_OP_WRITE")?,
        op_zone_append: code("REQ_OP_ZONE_APPEND")?,
        op_flush: code("REQ_OP_FLUSH")?,
        op_discard: code("REQ_OP_DISCARD")?,
        op_secure_erase: code("REQ_OP_SECURE_ERASE")?,
        op_write_zeroes: code("REQ_OP_WRITE_ZEROES")?,
        op_drv_out: code("REQ_OP_DRV_OUT")?,
        flag_fua: bit("__REQ_FUA")?,
        flag_preflush: bit("__REQ_PREFLUSH")?,
        bio_window: 0,
        rq_window: 0,
    };
    let w = agent_common::in_layout_window;
    let layout = BlockLayout {
        bio_window: u32::from(
            w(layout.bio_bdev, 8)
                && w(layout.bio_opf, 4)
                && w(layout.bio_sector, 8)
                && w(layout.bio_size, 4)
                && w(layout.bio_next, 8),
        ),
        rq_window: u32::from(
            w(layout.rq_q, 8)
                && w(layout.rq_cmd_flags, 4)
                && w(layout.rq_sector, 8)
                && w(layout.rq_bio, 8),
        ),
        ..layout
    };
    tracing::debug!(?layout, "block layer layout from BTF");
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncation_are_refused() {
        assert!(Btf::parse(&[0; 10]).is_err());
        assert!(Btf::parse(&[0; 64]).is_err(), "bad magic");
        let mut h = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 1000, 0, 10] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        let e = Btf::parse(&h).err().unwrap();
        assert!(format!("{e:#}").contains("beyond the file"), "{e:#}");
    }

    /// The running kernel's BTF (every test machine has it: DESIGN.md requires it).
    #[test]
    fn kernel_block_layer_offsets_resolve() {
        let btf = match Btf::kernel() {
            Ok(b) => b,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: no kernel BTF here: {e:#}");
                return;
            }
            Err(e) => panic!("no kernel BTF: {e:#}"),
        };
        let (sector, size) = btf.member("request", &["__sector"]).unwrap();
        assert_eq!(size, 8);
        assert!(sector > 0);
        assert_eq!(btf.member("request", &["q"]).unwrap().1, 8);
        assert_eq!(btf.member("bio", &["bi_iter", "bi_size"]).unwrap().1, 4);
        let (iter, _) = btf.member("bio", &["bi_iter"]).unwrap();
        let (sec, _) = btf.member("bvec_iter", &["bi_sector"]).unwrap();
        assert_eq!(
            btf.member("bio", &["bi_iter", "bi_sector"]).unwrap().0,
            iter + sec
        );
        assert_eq!(btf.enum_value("REQ_OP_WRITE").unwrap(), 1);
        assert_eq!(btf.enum_value("REQ_OP_DISCARD").unwrap(), 3);
        assert!(btf.member("request", &["no_such_field"]).is_err());
        assert!(btf.enum_value("NO_SUCH_ENUMERATOR_X").is_err());
    }
}
