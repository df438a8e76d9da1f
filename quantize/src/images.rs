//! Calibration inputs from a folder of images and a preprocessing spec.
//!
//! Each image (PNG or JPEG, sorted by file name) is decoded, resized to the spec's size
//! (bilinear), converted to the channel order the model expects, scaled, normalised per
//! channel as `(pixel × scale − mean) / std`, and laid out NCHW or NHWC with a batch of 1.
//!
//! A spec is written as comma-separated `key=value` pairs, e.g.
//! `size=48x192,order=bgr,mean=0.5,std=0.5` (PP-OCR) or
//! `size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225` (ImageNet). Keys: `size=HxW`
//! (required), `layout=nchw|nhwc` (nchw), `order=rgb|bgr|gray` (rgb), `scale=F` (1/255),
//! `mean=F[/F/F]` (0), `std=F[/F/F]` (1), `input=NAME` (the model's first input).

use std::path::Path;

use crate::error::{QuantizeError, Result};

/// Memory order of the image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[1, C, H, W]`
    Nchw,
    /// `[1, H, W, C]`
    Nhwc,
}

/// Channel order (and count) of the image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (OpenCV-trained models such as PP-OCR).
    Bgr,
    /// One luminance channel.
    Gray,
}

/// How an image file becomes a model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// The model input it feeds (`None`: the first input).
    pub input: Option<String>,
    /// Height after resizing.
    pub height: u32,
    /// Width after resizing.
    pub width: u32,
    /// Tensor layout.
    pub layout: Layout,
    /// Channel order.
    pub order: ChannelOrder,
    /// Multiplies each 0..255 pixel first.
    pub scale: f32,
    /// Subtracted per channel after scaling.
    pub mean: [f32; 3],
    /// Divides per channel after the mean.
    pub std: [f32; 3],
}

impl std::str::FromStr for Preprocess {
    type Err = QuantizeError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad =
            |what: &str| QuantizeError::BadArgument(format!("preprocess spec {spec:?}: {what}"));
        let triple = |v: &str| -> Result<[f32; 3]> {
            let parts: Vec<f32> = v
                .split('/')
                .map(|p| p.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(&format!("{v:?} is not a number or F/F/F")))?;
            match parts.as_slice() {
                [x] => Ok([*x; 3]),
                [a, b, c] => Ok([*a, *b, *c]),
                _ => Err(bad(&format!("{v:?}: give one value or three"))),
            }
        };
        let mut p = Preprocess {
            input: None,
            height: 0,
            width: 0,
            layout: Layout::Nchw,
            order: ChannelOrder::Rgb,
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        for pair in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("{pair:?} is not key=value")))?;
            match k.trim() {
                "size" => {
                    let (h, w) = v
                        .split_once('x')
                        .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                        .filter(|(h, w): &(u32, u32)| *h > 0 && *w > 0)
                        .ok_or_else(|| bad("size must be HxW, both above 0"))?;
                    (p.height, p.width) = (h, w);
                }
                "layout" => {
                    p.layout = match v {
                        "nchw" => Layout::Nchw,
                        "nhwc" => Layout::Nhwc,
                        _ => return Err(bad("layout is nchw or nhwc")),
                    }
                }
                "order" => {
                    p.order = match v {
                        "rgb" => ChannelOrder::Rgb,
                        "bgr" => ChannelOrder::Bgr,
                        "gray" => ChannelOrder::Gray,
                        _ => return Err(bad("order is rgb, bgr or gray")),
                    }
                }
                "scale" => p.scale = v.parse().map_err(|_| bad("scale is a number"))?,
                "mean" => p.mean = triple(v)?,
                "std" => {
                    p.std = triple(v)?;
                    if p.std.contains(&0.0) {
                        return Err(bad("std must not be 0"));
                    }
                }
                "input" => p.input = Some(v.to_string()),
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        if p.height == 0 {
            return Err(bad("size=HxW is required"));
        }
        Ok(p)
    }
}

impl Preprocess {
    /// Channels of the tensor.
    pub fn channels(&self) -> usize {
        if self.order == ChannelOrder::Gray {
            1
        } else {
            3
        }
    }

    /// The tensor for one image already decoded.
    pub fn tensor(&self, image: &image::DynamicImage) -> Result<tern::Tensor> {
        let (h, w, c) = (self.height as usize, self.width as usize, self.channels());
        let rgb = image::imageops::resize(
            &image.to_rgb8(),
            self.width,
            self.height,
            image::imageops::FilterType::Triangle,
        );
        let mut data = vec![0f32; c * h * w];
        for (x, y, px) in rgb.enumerate_pixels() {
            let [r, g, b] = px.0.map(f32::from);
            let values = match self.order {
                ChannelOrder::Rgb => [r, g, b],
                ChannelOrder::Bgr => [b, g, r],
                // ITU-R BT.601 luma, as PIL's convert("L").
                ChannelOrder::Gray => [0.299 * r + 0.587 * g + 0.114 * b, 0.0, 0.0],
            };
            let (x, y) = (x as usize, y as usize);
            for (ch, v) in values.iter().take(c).enumerate() {
                let index = match self.layout {
                    Layout::Nchw => (ch * h + y) * w + x,
                    Layout::Nhwc => (y * w + x) * c + ch,
                };
                data[index] = (v * self.scale - self.mean[ch]) / self.std[ch];
            }
        }
        let shape = match self.layout {
            Layout::Nchw => [1, c, h, w],
            Layout::Nhwc => [1, h, w, c],
        };
        Ok(tern::Tensor::from_vec(&shape, data)?)
    }
}

/// One calibration sample per PNG/JPEG file in `dir` (sorted by name), each feeding `input`.
pub fn samples_from_folder(
    dir: &Path,
    spec: &Preprocess,
    input: &str,
) -> Result<Vec<Vec<(String, tern::Tensor)>>> {
    let entries = std::fs::read_dir(dir).map_err(|source| QuantizeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(QuantizeError::BadCalibration(format!(
            "no .png/.jpg/.jpeg images in {}",
            dir.display()
        )));
    }
    let input = spec.input.clone().unwrap_or_else(|| input.to_string());
    files
        .iter()
        .map(|path| {
            let image = image::open(path).map_err(|e| {
                QuantizeError::BadCalibration(format!("cannot decode {}: {e}", path.display()))
            })?;
            Ok(vec![(input.clone(), spec.tensor(&image)?)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_by_three() -> image::DynamicImage {
        // 3 wide, 2 high; pixel (x, y) = (10x + y, 100 + x, 200 + y).
        let img = image::RgbImage::from_fn(3, 2, |x, y| {
            image::Rgb([(10 * x + y) as u8, (100 + x) as u8, (200 + y) as u8])
        });
        image::DynamicImage::ImageRgb8(img)
    }

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let p: Preprocess = "size=48x192,order=bgr,mean=0.5,std=0.5".parse().unwrap();
        assert_eq!((p.height, p.width, p.order), (48, 192, ChannelOrder::Bgr));
        assert_eq!((p.mean, p.std), ([0.5; 3], [0.5; 3]));
        let p: Preprocess = "size=2x2,mean=0.485/0.456/0.406,layout=nhwc"
            .parse()
            .unwrap();
        assert_eq!((p.mean[2], p.layout), (0.406, Layout::Nhwc));
        for bad in [
            "",
            "order=bgr",
            "size=0x4",
            "size=4",
            "size=2x2,std=0",
            "size=2x2,mean=1/2",
            "size=2x2,colour=red",
        ] {
            assert!(
                matches!(
                    bad.parse::<Preprocess>(),
                    Err(QuantizeError::BadArgument(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn pixels_land_where_the_layout_says_normalised() {
        let img = two_by_three();
        let p: Preprocess = "size=2x3,order=bgr,scale=1,mean=1/2/3,std=2"
            .parse()
            .unwrap();
        let t = p.tensor(&img).unwrap();
        assert_eq!(t.shape(), &[1, 3, 2, 3]);
        let v = t.to_f32_vec().unwrap();
        // NCHW, BGR: channel 0 is blue = 200 + y; (value - mean[0]) / std.
        let at = |c: usize, y: usize, x: usize| v[(c * 2 + y) * 3 + x];
        assert_eq!(at(0, 1, 2), (201.0 - 1.0) / 2.0);
        assert_eq!(at(1, 0, 2), (102.0 - 2.0) / 2.0);
        assert_eq!(at(2, 1, 2), (21.0 - 3.0) / 2.0);

        let p: Preprocess = "size=2x3,layout=nhwc,scale=1".parse().unwrap();
        let t = p.tensor(&img).unwrap();
        assert_eq!(t.shape(), &[1, 2, 3, 3]);
        let v = t.to_f32_vec().unwrap();
        // NHWC, RGB: (y=1, x=2) red = 21.
        assert_eq!(v[(3 + 2) * 3], 21.0);

        let p: Preprocess = "size=2x3,order=gray,scale=1".parse().unwrap();
        let v = p.tensor(&img).unwrap().to_f32_vec().unwrap();
        assert!((v[0] - (0.587 * 100.0 + 0.114 * 200.0)).abs() < 1e-3);
    }

    #[test]
    fn resizing_keeps_a_flat_image_flat() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            17,
            5,
            image::Rgb([51, 102, 204]),
        ));
        let p: Preprocess = "size=48x192".parse().unwrap();
        let v = p.tensor(&img).unwrap().to_f32_vec().unwrap();
        assert_eq!(v.len(), 3 * 48 * 192);
        assert!((v[0] - 0.2).abs() < 1e-6 && (v[v.len() - 1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn folders_without_images_or_with_broken_ones_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("tern-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p: Preprocess = "size=4x4".parse().unwrap();
        assert!(matches!(
            samples_from_folder(&dir, &p, "x"),
            Err(QuantizeError::BadCalibration(_))
        ));
        std::fs::write(dir.join("a.png"), b"not a png").unwrap();
        let err = samples_from_folder(&dir, &p, "x").unwrap_err();
        assert!(err.to_string().contains("a.png"), "{err}");
        two_by_three().save(dir.join("a.png")).unwrap();
        let s = samples_from_folder(&dir, &p, "x").unwrap();
        assert_eq!((s.len(), s[0][0].0.as_str()), (1, "x"));
        assert!(matches!(
            samples_from_folder(&dir.join("missing"), &p, "x"),
            Err(QuantizeError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
