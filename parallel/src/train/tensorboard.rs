//! TensorBoard event files: the training curves (loss, lr, grad_norm, tokens/s, MFU, … per step) written
//! as `events.out.tfevents.<unix time>.<host>` in the run's output directory, so `tensorboard --logdir
//! <output_dir>` shows them.
//!
//! Format (what TensorBoard's reader expects): a sequence of records, each
//! `u64 length (LE) · u32 masked_crc32c(length bytes) · data · u32 masked_crc32c(data)`, where `data` is a
//! serialized `tensorflow.Event` protobuf and `masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`. The
//! first event carries `file_version: "brain.Event:2"`; every later one carries a step, a wall time and a
//! `Summary` of `simple_value` scalars. Only the protobuf fields used here are declared.
//!
//! Each record is flushed as it is written, so a killed run keeps every finished step; a resumed run opens a new
//! file (TensorBoard merges the files of a directory and shows the later value of a repeated step).

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

/// `tensorflow.Event` (the fields we write).
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a scalar.
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: event files are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Appends scalar summaries to one event file (see the module docs).
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// Creates a new event file in `dir` and writes its version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let t = now();
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", t as u64));
            n += 1;
        }
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        w.write_event(&Event {
            wall_time: t,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every `(tag, value)` scalar.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let summary = Summary {
            value: values
                .iter()
                .map(|(tag, v)| SummaryValue {
                    tag: tag.to_string(),
                    simple_value: Some(*v as f32),
                })
                .collect(),
        };
        self.write_event(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(summary),
        })
    }

    fn write_event(&mut self, e: &Event) -> std::io::Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&rec)?;
        self.file.flush()
    }
}

/// Reads back the scalar events of a file written by [`EventWriter`]: `(step, tag, value)`, checking every
/// record's length and data checksums (used by tests and `qctl` to verify a run's curves).
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<(u64, String, f32)>> {
    let bytes = std::fs::read(path)?;
    let bad = |m: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {m}", path.display()),
        )
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated record header"))?;
        let len_bytes: [u8; 8] = header[..8].try_into().expect("8 bytes");
        if u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) != masked_crc(&len_bytes)
        {
            return Err(bad("length checksum mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes) as usize;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("truncated record"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("truncated checksum"))?;
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(data) {
            return Err(bad("data checksum mismatch"));
        }
        let e = Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?;
        for v in e.summary.map(|s| s.value).unwrap_or_default() {
            out.push((e.step as u64, v.tag, v.simple_value.unwrap_or(f32::NAN)));
        }
        at += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn scalars_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("train/loss", 2.5), ("train/lr", 1e-4)])
            .unwrap();
        w.scalars(2, &[("train/loss", 2.25)]).unwrap();
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(
            got,
            vec![
                (1, "train/loss".into(), 2.5),
                (1, "train/lr".into(), 1e-4),
                (2, "train/loss".into(), 2.25)
            ]
        );
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(
            read_scalars(w.path()).is_err(),
            "a corrupted record is detected"
        );
    }
}
