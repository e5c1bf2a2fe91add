//! Channel programs written as text: the input of `vccw translate` and `vccw run`.
//!
//! ```text
//! # comments run to the end of a line
//! orb fmt=1 cpa=0x1000 key=0 c64=0 i2k=0 midaw=0 suspend=0 lpm=0xff intparm=0x1
//! map 0x0 0x100000 rw            # guest memory: iova size perm (r, w, rw)
//! key 0x3000 0x30                # storage key of the page holding 0x3000
//! ccw 0x1000 sense-id cc|sli 32 0x2000   # address command flags count data-address
//! ccw0 0x1008 read - 16 0x3000  # a format-0 CCW image
//! idaw1 0x5000 0x30400 0x40800   # format-1 IDAWs stored from 0x5000
//! idaw2 0x5100 0x30f00 0x80000   # format-2 IDAWs
//! midaw 0x6000 0x30200:512 0x40400:512:skip 0x60600:512:last
//! data 0x3000 "VOL1" c1c2c3      # bytes: quoted ASCII or hex
//! dump 0x10000 80                # `vccw run`: show these guest bytes after the program
//! ```
//! Commands are hex codes or names: read, write, control, sense, sense-id, tic, noop,
//! read-backward. Flags are `-` or names joined by `|`: cd cc sli skp pci ida s mida.

use thiserror::Error;

use crate::ccw::{Ccw0, Ccw1, CcwFlags, Midaw, MidawFlags};
use crate::iommu_store::{Backing, IommuStore, Perm};
use crate::orb::{Orb, OrbControls};

/// Longest range one `dump` statement may show (1 MiB).
pub const MAX_DUMP: u64 = 1 << 20;

/// A parse error, with its line number.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

/// One guest memory mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Guest-physical start.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Access the mapping allows.
    pub perm: Perm,
}

/// A parsed program file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramFile {
    /// The guest ORB.
    pub orb: Orb,
    /// Guest memory mappings.
    pub maps: Vec<Mapping>,
    /// Storage keys: (guest address, key).
    pub keys: Vec<(u64, u8)>,
    /// Bytes to place in guest memory: CCWs, lists, data.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Guest ranges `vccw run` shows after the program: (address, length).
    pub dumps: Vec<(u64, u64)>,
}

/// Why a program file could not be loaded into a store.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A mapping was refused.
    #[error("map {iova:#x}+{size:#x}: {source}")]
    Map {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
        /// The store's reason.
        source: crate::iommu_store::StoreError,
    },
    /// Bytes fall outside the mappings.
    #[error("bytes at {0:#x} are outside the mapped memory")]
    Write(u64),
    /// A storage key could not be set.
    #[error("key at {0:#x}: {1}")]
    Key(u64, crate::iommu_store::StoreError),
}

impl ProgramFile {
    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut pf = ProgramFile {
            orb: Orb {
                intparm: 0,
                ctl: OrbControls::new().with_format1(true).with_lpm(0xff),
                cpa: 0,
            },
            maps: Vec::new(),
            keys: Vec::new(),
            writes: Vec::new(),
            dumps: Vec::new(),
        };
        let mut have_orb = false;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |msg: String| ParseError { line, msg };
            let l = strip_comment(raw);
            let words = split_words(l).map_err(|m| err(m.to_string()))?;
            let Some((kw, args)) = words.split_first() else {
                continue;
            };
            match kw.as_str() {
                "orb" => {
                    pf.orb = parse_orb(args).map_err(err)?;
                    have_orb = true;
                }
                "map" => {
                    let [iova, size, perm] = args else {
                        return Err(err("map takes: iova size perm".into()));
                    };
                    let perm = match perm.as_str() {
                        "r" => Perm::READ,
                        "w" => Perm::WRITE,
                        "rw" => Perm::READ_WRITE,
                        p => return Err(err(format!("unknown permission {p:?}"))),
                    };
                    pf.maps.push(Mapping {
                        iova: num(iova).map_err(err)?,
                        size: num(size).map_err(err)?,
                        perm,
                    });
                }
                "key" => {
                    let [addr, key] = args else {
                        return Err(err("key takes: address key".into()));
                    };
                    let key = num(key).map_err(err)?;
                    let key = u8::try_from(key).map_err(|_| err(format!("key {key:#x} > 0xff")))?;
                    pf.keys.push((num(addr).map_err(err)?, key));
                }
                "ccw" | "ccw0" => {
                    let [addr, cmd, flags, count, cda] = args else {
                        return Err(err(format!(
                            "{kw} takes: address command flags count data-address"
                        )));
                    };
                    let cmd = command(cmd).map_err(err)?;
                    let flags = parse_flags(flags).map_err(err)?;
                    let count = u16::try_from(num(count).map_err(err)?)
                        .map_err(|_| err("count > 65535".into()))?;
                    let cda = u32::try_from(num(cda).map_err(err)?)
                        .map_err(|_| err("data address > 32 bits".into()))?;
                    let bytes = if kw == "ccw" {
                        Ccw1 {
                            cmd,
                            flags,
                            count,
                            cda,
                        }
                        .to_bytes()
                    } else {
                        if cda > 0xff_ffff {
                            return Err(err("format-0 data address > 24 bits".into()));
                        }
                        Ccw0 {
                            cmd,
                            cda,
                            flags,
                            count,
                        }
                        .to_bytes()
                    };
                    pf.writes.push((num(addr).map_err(err)?, bytes.to_vec()));
                }
                "idaw1" | "idaw2" => {
                    let (addr, ws) = args
                        .split_first()
                        .ok_or_else(|| err(format!("{kw} takes: address idaw...")))?;
                    let mut bytes = Vec::new();
                    for w in ws {
                        let v = num(w).map_err(err)?;
                        if kw == "idaw1" {
                            let v = u32::try_from(v)
                                .map_err(|_| err("format-1 IDAW > 32 bits".into()))?;
                            bytes.extend_from_slice(&v.to_be_bytes());
                        } else {
                            bytes.extend_from_slice(&v.to_be_bytes());
                        }
                    }
                    pf.writes.push((num(addr).map_err(err)?, bytes));
                }
                "midaw" => {
                    let (addr, ms) = args.split_first().ok_or_else(|| {
                        err("midaw takes: address addr:count[:skip][:last]...".into())
                    })?;
                    let mut bytes = Vec::new();
                    for m in ms {
                        bytes.extend_from_slice(&parse_midaw(m).map_err(err)?.to_bytes());
                    }
                    pf.writes.push((num(addr).map_err(err)?, bytes));
                }
                "data" => {
                    let (addr, items) = args
                        .split_first()
                        .ok_or_else(|| err("data takes: address bytes...".into()))?;
                    let mut bytes = Vec::new();
                    for it in items {
                        if let Some(s) = it.strip_prefix('"') {
                            bytes.extend_from_slice(s.as_bytes());
                        } else {
                            bytes.extend(hex(it).map_err(err)?);
                        }
                    }
                    pf.writes.push((num(addr).map_err(err)?, bytes));
                }
                "dump" => {
                    let [addr, len] = args else {
                        return Err(err("dump takes: address length".into()));
                    };
                    let (addr, len) = (num(addr).map_err(err)?, num(len).map_err(err)?);
                    // A dump is printed, so keep it to what a terminal can take.
                    if len == 0 || len > MAX_DUMP || addr.checked_add(len).is_none() {
                        return Err(err(format!("dump length must be 1..={MAX_DUMP:#x}")));
                    }
                    pf.dumps.push((addr, len));
                }
                other => return Err(err(format!("unknown statement {other:?}"))),
            }
        }
        if !have_orb {
            return Err(ParseError {
                line: 0,
                msg: "no orb statement".into(),
            });
        }
        Ok(pf)
    }

    /// Maps the memory, sets keys and writes the bytes into `store`.
    pub fn load(&self, store: &IommuStore) -> Result<(), LoadError> {
        for m in &self.maps {
            store
                .map_dma(m.iova, m.size, m.perm, Backing::Anonymous)
                .map_err(|source| LoadError::Map {
                    iova: m.iova,
                    size: m.size,
                    source,
                })?;
        }
        for (addr, key) in &self.keys {
            store
                .set_storage_key(*addr, *key)
                .map_err(|e| LoadError::Key(*addr, e))?;
        }
        for (addr, bytes) in &self.writes {
            store
                .write(*addr, bytes)
                .map_err(|_| LoadError::Write(*addr))?;
        }
        Ok(())
    }
}

fn strip_comment(l: &str) -> &str {
    // '#' outside quotes starts a comment.
    let mut in_q = false;
    for (i, ch) in l.char_indices() {
        match ch {
            '"' => in_q = !in_q,
            '#' if !in_q => return &l[..i],
            _ => {}
        }
    }
    l
}

/// Splits on white space; a quoted word keeps its spaces and is returned with a leading `"`.
fn split_words(l: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut chars = l.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::from("\"");
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(ch) => w.push(ch),
                    None => return Err("unterminated string"),
                }
            }
            out.push(w);
        } else {
            let mut w = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                w.push(ch);
                chars.next();
            }
            out.push(w);
        }
    }
    Ok(out)
}

fn num(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(&h.replace('_', ""), 16)
    } else {
        s.replace('_', "").parse()
    };
    r.map_err(|_| format!("bad number {s:?}"))
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err(format!("odd number of hex digits in {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex {s:?}")))
        .collect()
}

fn command(s: &str) -> Result<u8, String> {
    Ok(match s {
        "write" => 0x01,
        "read" => 0x02,
        "control" | "noop" => 0x03,
        "sense" => 0x04,
        "tic" => 0x08,
        "read-backward" => 0x0C,
        "sense-id" => 0xE4,
        _ => u8::try_from(num(s)?).map_err(|_| format!("command {s:?} > 0xff"))?,
    })
}

fn parse_flags(s: &str) -> Result<CcwFlags, String> {
    let mut f = CcwFlags::new();
    if s == "-" {
        return Ok(f);
    }
    for name in s.split('|') {
        f = match name {
            "cd" => f.with_cd(true),
            "cc" => f.with_cc(true),
            "sli" => f.with_sli(true),
            "skp" => f.with_skp(true),
            "pci" => f.with_pci(true),
            "ida" => f.with_ida(true),
            "s" => f.with_s(true),
            "mida" => f.with_mida(true),
            _ => return Err(format!("unknown CCW flag {name:?}")),
        };
    }
    Ok(f)
}

fn parse_midaw(s: &str) -> Result<Midaw, String> {
    let mut parts = s.split(':');
    let addr = num(parts.next().unwrap_or_default())?;
    let count = parts
        .next()
        .ok_or_else(|| format!("MIDAW {s:?} needs addr:count"))?;
    let count = u16::try_from(num(count)?).map_err(|_| "MIDAW count > 65535".to_string())?;
    let mut flags = MidawFlags::new();
    for p in parts {
        flags = match p {
            "skip" => flags.with_skip(true),
            "last" => flags.with_last(true),
            "dtic" => flags.with_dtic(true),
            _ => return Err(format!("unknown MIDAW flag {p:?}")),
        };
    }
    Ok(Midaw {
        reserved: 0,
        flags,
        count,
        data: addr,
    })
}

fn parse_orb(args: &[String]) -> Result<Orb, String> {
    let mut o = Orb {
        intparm: 0,
        ctl: OrbControls::new().with_format1(true).with_lpm(0xff),
        cpa: 0,
    };
    let mut have_cpa = false;
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("ORB field {a:?} is not key=value"))?;
        let v = num(v)?;
        let b = |v: u64| -> Result<bool, String> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(format!("{k} takes 0 or 1")),
            }
        };
        match k {
            "fmt" => o.ctl.set_format1(b(v)?),
            "cpa" => {
                o.cpa = u32::try_from(v).map_err(|_| "cpa > 32 bits".to_string())?;
                have_cpa = true;
            }
            "intparm" => {
                o.intparm = u32::try_from(v).map_err(|_| "intparm > 32 bits".to_string())?
            }
            "key" if v < 16 => o.ctl.set_key(v as u8),
            "lpm" if v < 256 => o.ctl.set_lpm(v as u8),
            "c64" => o.ctl.set_format2_idaw(b(v)?),
            "i2k" => o.ctl.set_idaw_2k(b(v)?),
            "midaw" => o.ctl.set_midaw(b(v)?),
            "suspend" => o.ctl.set_suspend(b(v)?),
            "pfch" => o.ctl.set_prefetch(b(v)?),
            "ils" => o.ctl.set_incorrect_length_suppression(b(v)?),
            "isic" => o.ctl.set_initial_status_interrupt(b(v)?),
            "ssic" => o.ctl.set_suppress_suspended_interrupt(b(v)?),
            "tm" => o.ctl.set_transport_mode(b(v)?),
            _ => return Err(format!("unknown or out-of-range ORB field {a:?}")),
        }
    }
    if !have_cpa {
        return Err("orb needs cpa=".into());
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_statement() {
        let pf = ProgramFile::parse(
            "orb fmt=1 cpa=0x1000 c64=1 midaw=1 key=3 intparm=7 # the ORB\n\
             map 0 0x10000 rw\nkey 0x3000 0x38\n\
             ccw 0x1000 sense-id cc|sli 32 0x2000\n\
             ccw0 0x1008 0x02 cd 16 0x3000\n\
             idaw1 0x5000 0x30400 0x40800\nidaw2 0x5100 0x80000\n\
             midaw 0x6000 0x30200:512:skip 0x60600:16:last\n\
             data 0x3000 \"AB # C\" c1c2\n",
        )
        .unwrap();
        assert_eq!(pf.orb.cpa, 0x1000);
        assert!(pf.orb.ctl.format2_idaw() && pf.orb.ctl.midaw());
        assert_eq!((pf.orb.ctl.key(), pf.orb.intparm), (3, 7));
        assert_eq!(pf.keys, vec![(0x3000, 0x38)]);
        assert_eq!(
            pf.writes[0],
            (0x1000, vec![0xE4, 0x60, 0, 32, 0, 0, 0x20, 0])
        );
        assert_eq!(
            pf.writes[1],
            (0x1008, vec![0x02, 0, 0x30, 0, 0x80, 0, 0, 16])
        );
        assert_eq!(pf.writes[2], (0x5000, vec![0, 3, 4, 0, 0, 4, 8, 0]));
        assert_eq!(pf.writes[3].1, 0x80000u64.to_be_bytes().to_vec());
        let m = &pf.writes[4].1;
        assert_eq!(m.len(), 32);
        assert_eq!(&m[5..8], &[0x40, 0x02, 0x00]);
        assert_eq!(&m[21..24], &[0x80, 0x00, 0x10]);
        assert_eq!(pf.writes[5], (0x3000, b"AB # C\xc1\xc2".to_vec()));
        assert!(pf.dumps.is_empty());
    }

    #[test]
    fn dump_statement() {
        let pf = ProgramFile::parse("orb cpa=8\ndump 0x10000 80\ndump 4096 0x1000 # page").unwrap();
        assert_eq!(pf.dumps, vec![(0x10000, 80), (4096, 0x1000)]);
        for bad in [
            "dump 0x10000",
            "dump 1 2 3",
            "dump 0x10 0",
            "dump 0x10 0x100001",
            "dump 0xffffffffffffffff 2",
            "dump x 2",
        ] {
            let e = ProgramFile::parse(&format!("orb cpa=8\n{bad}")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        let e = ProgramFile::parse("orb cpa=8\nccw 0x10 read bogus 1 0").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.msg.contains("bogus"));
        assert!(ProgramFile::parse("map 0 1 rw").is_err(), "no orb");
        assert!(ProgramFile::parse("orb fmt=1").is_err(), "no cpa");
        assert!(ProgramFile::parse("orb cpa=8 key=16").is_err());
        assert!(ProgramFile::parse("orb cpa=8\nccw0 0 read - 1 0x1000000").is_err());
        assert!(ProgramFile::parse("orb cpa=8\ndata 0 abc").is_err());
        assert!(ProgramFile::parse("orb cpa=8\ndata 0 \"abc").is_err());
        assert!(ProgramFile::parse("orb cpa=8\nccw 0 read - 65536 0").is_err());
    }
}
