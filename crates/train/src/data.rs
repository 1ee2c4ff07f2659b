//! MNIST in the IDX format (gzip-compressed or raw): the 8,000-digit copy in shared/data and the
//! full 60,000-digit distribution (`train-*`, `t10k-*`) load unchanged.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// File stems tried in order: ours, then the original MNIST names.
    fn stems(self) -> &'static [&'static str] {
        match self {
            Split::Train => &["train"],
            Split::Val => &["val", "t10k"],
        }
    }
}

/// 8-bit digits with labels.
#[derive(Debug, Clone)]
pub struct Digits {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

fn data_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Data { path: path.to_path_buf(), message: message.into() }
}

fn find(dir: &Path, split: Split, kind: &str) -> Result<PathBuf> {
    for stem in split.stems() {
        for ext in ["", ".gz"] {
            let path = dir.join(format!("{stem}-{kind}{ext}"));
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    let tried = split.stems().iter().map(|s| format!("{s}-{kind}[.gz]")).collect::<Vec<_>>().join(", ");
    Err(data_err(dir, format!("no {tried} here; get MNIST in IDX format (see README) and pass --data DIR")))
}

/// Read an IDX file: (dimensions, bytes). Gzip is detected by its magic bytes.
pub fn read_idx(path: &Path, expected_magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| data_err(path, format!("corrupt gzip data: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 {
        return Err(data_err(path, "file too short for an IDX header"));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(data_err(path, format!("IDX magic {magic} where {expected_magic} was expected")));
    }
    let rank = (magic & 0xff) as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(data_err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let body = bytes[header..].to_vec();
    if body.len() != expected {
        return Err(data_err(path, format!("IDX body has {} bytes, header {dims:?} needs {expected}", body.len())));
    }
    Ok((dims, body))
}

impl Digits {
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let image_path = find(dir, split, "images-idx3-ubyte")?;
        let label_path = find(dir, split, "labels-idx1-ubyte")?;
        let (dims, images) = read_idx(&image_path, 2051)?;
        let (ldims, labels) = read_idx(&label_path, 2049)?;
        if dims[0] != ldims[0] {
            return Err(data_err(&label_path, format!("{} labels for {} images", ldims[0], dims[0])));
        }
        if let Some(bad) = labels.iter().find(|&&l| l > 9) {
            return Err(data_err(&label_path, format!("label {bad} is not a digit")));
        }
        Ok(Self { images, labels, rows: dims[1], cols: dims[2] })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keep the first `n` digits (for quick runs and tests).
    pub fn truncate(&mut self, n: usize) {
        self.labels.truncate(n);
        self.images.truncate(n * self.rows * self.cols);
    }

    /// Images (B, 1, rows, cols) scaled to [-1, 1], and u32 labels (B,).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let px = self.rows * self.cols;
        let mut data = Vec::with_capacity(indices.len() * px);
        for &i in indices {
            data.extend(self.images[i * px..(i + 1) * px].iter().map(|&v| v as f32 / 127.5 - 1.0));
        }
        let images = Tensor::from_vec(data, (indices.len(), 1, self.rows, self.cols), device)?;
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((images, Tensor::from_vec(labels, indices.len(), device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_idx(path: &Path, magic: u32, dims: &[u32], body: &[u8], gzip: bool) {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(body);
        if gzip {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            bytes = enc.finish().unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_raw_and_gzip_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(&dir.path().join("train-images-idx3-ubyte.gz"), 2051, &[2, 2, 2], &[0, 255, 1, 2, 3, 4, 5, 6], true);
        write_idx(&dir.path().join("train-labels-idx1-ubyte"), 2049, &[2], &[3, 9], false);
        let d = Digits::load(dir.path(), Split::Train).unwrap();
        assert_eq!((d.len(), d.rows, d.cols), (2, 2, 2));
        let (x, y) = d.batch(&[1, 0], &Device::Cpu).unwrap();
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![9, 3]);
        assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[4..6], [-1.0, 1.0]);

        let err = Digits::load(dir.path(), Split::Val).unwrap_err().to_string();
        assert!(err.contains("val-images-idx3-ubyte") && err.contains("--data"), "{err}");

        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), [0x1f, 0x8b, 1, 2, 3]).unwrap();
        let err = Digits::load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("corrupt gzip"), "{err}");

        write_idx(&dir.path().join("train-images-idx3-ubyte.gz"), 2051, &[2, 2, 2], &[0, 1, 2], true);
        let err = Digits::load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("needs 8"), "{err}");
    }

    #[test]
    fn loads_the_shared_mnist_copy() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
        if !dir.exists() {
            // Outside this workplace the copy is not there; the synthetic test above covers the format.
            eprintln!("skipped: no MNIST copy at {}", dir.display());
            return;
        }
        let train = Digits::load(&dir, Split::Train).unwrap();
        let val = Digits::load(&dir, Split::Val).unwrap();
        assert_eq!((train.len(), val.len(), train.rows, train.cols), (7000, 1000, 28, 28));
    }
}
