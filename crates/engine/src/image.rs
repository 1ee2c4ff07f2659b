//! 8-bit images, PNG encoding with text metadata, and contact-sheet grids.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::samplers::{SolveStats, MAIN_NETWORK};
use crate::settings::{ImageInputs, SolveSettings};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// Row-major, channels interleaved.
    pub pixels: Vec<u8>,
}

/// Text metadata for image `i` of a generation (the CLI and the server write the same): the
/// canonical sampler and schedule, so the text parses back into the settings that made it.
pub fn generation_metadata(
    model: &str,
    settings: &SolveSettings,
    inputs: &ImageInputs,
    stats: &SolveStats,
    i: usize,
) -> Vec<(&'static str, String)> {
    let steps = if settings.sampler.is_adaptive() { stats.steps } else { settings.steps.max(stats.steps) };
    let mut fields = vec![
        ("Software", format!("flowgen {}", env!("CARGO_PKG_VERSION"))),
        ("model", model.to_string()),
        ("sampler", settings.sampler.canonical()),
        ("steps", steps.to_string()),
        ("nfe", stats.sample_nfe(i).to_string()),
        ("seed", inputs.seeds.get(i).map(u64::to_string).unwrap_or_default()),
        ("label", inputs.labels.get(i).map(u32::to_string).unwrap_or_default()),
        ("guidance", settings.guidance.to_string()),
        ("guidance_interval", format!("{},{}", settings.guidance_interval.0, settings.guidance_interval.1)),
        ("schedule", settings.schedule.canonical()),
    ];
    let auxiliary: Vec<String> = stats
        .evaluations
        .iter()
        .filter(|(name, _)| name.as_str() != MAIN_NETWORK)
        .map(|(name, count)| format!("{name}={count}"))
        .collect();
    if !auxiliary.is_empty() {
        fields.push(("auxiliary_nfe", auxiliary.join(",")));
    }
    fields
}

/// (B, C, H, W) in [-1, 1] -> one `Image` per row.
pub fn to_images(xs: &Tensor) -> Result<Vec<Image>> {
    let (b, c, h, w) = xs.dims4()?;
    if c != 1 && c != 3 {
        return Err(Error::invalid("image channels", format!("expected 1 or 3 channels, got {c}")));
    }
    let bytes = ((xs.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per_image = h * w * c;
    Ok(bytes
        .chunks(per_image)
        .take(b)
        .map(|px| Image { width: w, height: h, channels: c, pixels: px.to_vec() })
        .collect())
}

impl Image {
    /// PNG bytes with `metadata` as tEXt chunks (keyword, value).
    pub fn to_png(&self, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            encoder.set_color(if self.channels == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
            encoder.set_depth(png::BitDepth::Eight);
            for (key, value) in metadata {
                encoder.add_text_chunk(key.to_string(), value.clone()).map_err(|e| Error::Png(e.to_string()))?;
            }
            let mut writer = encoder.write_header().map_err(|e| Error::Png(e.to_string()))?;
            writer.write_image_data(&self.pixels).map_err(|e| Error::Png(e.to_string()))?;
            writer.finish().map_err(|e| Error::Png(e.to_string()))?;
        }
        Ok(out)
    }

    /// Decode a PNG written by `to_png`, returning the image and its text chunks.
    pub fn from_png(bytes: &[u8]) -> Result<(Image, Vec<(String, String)>)> {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().map_err(|e| Error::Png(e.to_string()))?;
        let size = reader.output_buffer_size().ok_or_else(|| Error::Png("image too large".into()))?;
        let mut buf = vec![0; size];
        let info = reader.next_frame(&mut buf).map_err(|e| Error::Png(e.to_string()))?;
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::Rgb => 3,
            other => return Err(Error::Png(format!("unsupported color type {other:?}"))),
        };
        buf.truncate(info.buffer_size());
        let text = reader.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
        Ok((Image { width: info.width as usize, height: info.height as usize, channels, pixels: buf }, text))
    }

    /// Tile images of equal size into a near-square grid with a 2-pixel gutter.
    pub fn grid(images: &[Image]) -> Result<Image> {
        let first = images.first().ok_or_else(|| Error::invalid("images", "grid of zero images"))?;
        if images.iter().any(|im| (im.width, im.height, im.channels) != (first.width, first.height, first.channels)) {
            return Err(Error::invalid("images", "grid images differ in size"));
        }
        const GUTTER: usize = 2;
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        let rows = images.len().div_ceil(cols);
        let (w, h, c) = (first.width, first.height, first.channels);
        let width = cols * w + (cols + 1) * GUTTER;
        let height = rows * h + (rows + 1) * GUTTER;
        let mut pixels = vec![0u8; width * height * c];
        for (idx, im) in images.iter().enumerate() {
            let (x0, y0) = (GUTTER + (idx % cols) * (w + GUTTER), GUTTER + (idx / cols) * (h + GUTTER));
            for y in 0..h {
                let src = &im.pixels[y * w * c..(y + 1) * w * c];
                let start = ((y0 + y) * width + x0) * c;
                pixels[start..start + w * c].copy_from_slice(src);
            }
        }
        Ok(Image { width, height, channels: c, pixels })
    }
}
