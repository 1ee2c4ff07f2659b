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

/// How images are delivered. PNG keeps the settings in tEXt chunks; JPEG and WebP carry them in
/// an XMP packet (JPEG APP1, WebP XMP chunk), so every format says how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    /// Baseline JPEG at `quality` 1-100.
    Jpeg {
        quality: u8,
    },
    /// Lossless WebP.
    Webp,
}

/// JPEG quality when a request names none.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

impl OutputFormat {
    pub const NAMES: [&'static str; 3] = ["png", "jpeg", "webp"];

    /// "png", "jpeg" (or "jpg") or "webp"; `quality` (1-100) applies to JPEG only.
    pub fn parse(name: &str, quality: Option<u8>) -> Result<Self> {
        let format = match name.trim().to_ascii_lowercase().as_str() {
            "png" => OutputFormat::Png,
            "jpeg" | "jpg" => OutputFormat::Jpeg { quality: quality.unwrap_or(DEFAULT_JPEG_QUALITY) },
            "webp" => OutputFormat::Webp,
            other => {
                return Err(Error::invalid(
                    "output_format",
                    format!("{other:?} is not one of {}", Self::NAMES.join(", ")),
                ))
            }
        };
        match (format, quality) {
            (OutputFormat::Jpeg { quality: q }, _) if !(1..=100).contains(&q) => {
                Err(Error::invalid("output_compression", format!("JPEG quality must be 1 to 100, got {q}")))
            }
            (OutputFormat::Png | OutputFormat::Webp, Some(_)) => {
                Err(Error::invalid("output_compression", "applies to jpeg only (png and webp are lossless here)"))
            }
            (format, _) => Ok(format),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg { .. } => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg { .. } => "jpg",
            other => other.name(),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg { .. } => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    pub fn quality(self) -> Option<u8> {
        match self {
            OutputFormat::Jpeg { quality } => Some(quality),
            _ => None,
        }
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An XMP packet holding `metadata` as attributes in flowgen's namespace.
pub fn xmp_packet(metadata: &[(&str, String)]) -> String {
    let attributes: String = metadata
        .iter()
        .filter(|(key, _)| key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(key, value)| format!("\n   flowgen:{key}=\"{}\"", xml_escape(value)))
        .collect();
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n<x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  <rdf:Description rdf:about=\"\" xmlns:flowgen=\"https://github.com/flowgen/ns/1.0/\"{attributes}/>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"r\"?>"
    )
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
    /// The image in `format`, with `metadata` (keyword, value) in the format's own metadata.
    pub fn encode(&self, format: OutputFormat, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        match format {
            OutputFormat::Png => self.to_png(metadata),
            OutputFormat::Jpeg { quality } => self.to_jpeg(quality, metadata),
            OutputFormat::Webp => self.to_webp(metadata),
        }
    }

    fn color(&self) -> image::ExtendedColorType {
        if self.channels == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        }
    }

    fn to_jpeg(&self, quality: u8, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        use image::ImageEncoder;
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality)
            .write_image(&self.pixels, self.width as u32, self.height as u32, self.color())
            .map_err(|e| Error::Png(format!("jpeg: {e}")))?;
        // XMP lives in an APP1 segment right after the start-of-image marker.
        let mut payload = b"http://ns.adobe.com/xap/1.0/\0".to_vec();
        payload.extend_from_slice(xmp_packet(metadata).as_bytes());
        let length = u16::try_from(payload.len() + 2).map_err(|_| Error::Png("jpeg: metadata too long".into()))?;
        let mut out = Vec::with_capacity(jpeg.len() + payload.len() + 4);
        out.extend_from_slice(&jpeg[..2]);
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        Ok(out)
    }

    fn to_webp(&self, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut encoder = image_webp::WebPEncoder::new(&mut out);
        encoder.set_xmp_metadata(xmp_packet(metadata).into_bytes());
        // WebP has no gray mode: a gray image is stored as RGB with equal channels.
        let (pixels, color) = if self.channels == 1 {
            (self.pixels.iter().flat_map(|&p| [p, p, p]).collect(), image_webp::ColorType::Rgb8)
        } else {
            (self.pixels.clone(), image_webp::ColorType::Rgb8)
        };
        encoder
            .encode(&pixels, self.width as u32, self.height as u32, color)
            .map_err(|e| Error::Png(format!("webp: {e}")))?;
        Ok(out)
    }

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
