//! The loss-curve PNG written next to the metrics log: training loss as a line, validation
//! loss as points, drawn with plotters' bitmap backend and written atomically. Text needs a
//! system font; on a machine without one the curve is still drawn, without labels.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::train::metrics::MetricRecord;

const SIZE: (u32, u32) = (1000, 600);

/// Draws `records` (finite `loss` values as the training line, `val_loss` as points) to the
/// PNG `path`, replacing it atomically.
pub fn plot_loss_curve(records: &[MetricRecord], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            r.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (r.step as f64, v))
        })
        .collect();

    // The backend picks the encoder from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}.png", std::process::id()));
    let drawn = draw(&tmp, &train, &val, true).or_else(|_| draw(&tmp, &train, &val, false));
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            path,
            format!("cannot draw the loss curve: {e}"),
        ));
    }
    std::fs::rename(&tmp, path).at(path)
}

fn draw(
    path: &Path,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    text: bool,
) -> std::result::Result<(), String> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    plot_into(&root, train, val, text).map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn plot_into<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    text: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (x_range, y_range) = ranges(train.iter().chain(val));
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption("Training loss", ("sans-serif", 28))
            .x_label_area_size(50)
            .y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(x_range, y_range)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(BLACK.mix(0.04))
            .draw()?;
    } else {
        chart.plotting_area().draw(&Rectangle::new(
            [
                (chart.x_range().start, chart.y_range().start),
                (chart.x_range().end, chart.y_range().end),
            ],
            BLACK.stroke_width(1),
        ))?;
    }
    let train_series =
        chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?;
    if text {
        train_series
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    }
    let val_series = chart.draw_series(val.iter().map(|&p| Circle::new(p, 5, RED.filled())))?;
    if text {
        val_series
            .label("val loss")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

/// Axis ranges covering all points with a 5% margin on the loss axis.
fn ranges<'a>(
    points: impl Iterator<Item = &'a (f64, f64)>,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    (0.0..x1, (y0 - pad)..(y1 + pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the PNG chunks, checking the signature, every chunk's CRC and the IHDR size.
    fn check_png(bytes: &[u8]) -> (u32, u32, usize) {
        fn crc32(data: &[u8]) -> u32 {
            let mut c = 0xFFFF_FFFFu32;
            for &b in data {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let (mut pos, mut dims, mut idat, mut end) = (8, (0, 0), 0, false);
        while pos + 12 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &bytes[pos + 4..pos + 8];
            let data = &bytes[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(
                crc,
                crc32(&bytes[pos + 4..pos + 8 + len]),
                "CRC of chunk {:?}",
                String::from_utf8_lossy(kind)
            );
            match kind {
                b"IHDR" => {
                    dims = (
                        u32::from_be_bytes(data[..4].try_into().unwrap()),
                        u32::from_be_bytes(data[4..8].try_into().unwrap()),
                    )
                }
                b"IDAT" => idat += len,
                b"IEND" => end = true,
                _ => {}
            }
            pos += 12 + len;
        }
        assert!(end && pos == bytes.len(), "PNG must end with IEND");
        (dims.0, dims.1, idat)
    }

    #[test]
    fn writes_a_valid_png_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("loss.png");
        let records: Vec<MetricRecord> = (1..=50)
            .map(|s| MetricRecord {
                step: s * 10,
                loss: 2.0 / (s as f64).sqrt() + 0.05 * ((s as f64) * 0.7).sin(),
                lr: 1e-4,
                tokens_per_s: 0.0,
                val_loss: (s % 10 == 0).then_some(1.5 / (s as f64).sqrt()),
                ..Default::default()
            })
            .collect();
        plot_loss_curve(&records, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (w, h, idat) = check_png(&bytes);
        println!(
            "loss.png: {} bytes, {w}x{h}, {idat} bytes of image data",
            bytes.len()
        );
        assert_eq!((w, h), SIZE);
        assert!(bytes.len() > 5_000, "{} bytes", bytes.len());
        // A plot with content compresses worse than a blank canvas.
        let blank = d.path().join("blank.png");
        plot_loss_curve(&[], &blank).unwrap();
        let blank_bytes = std::fs::read(&blank).unwrap();
        let (_, _, blank_idat) = check_png(&blank_bytes);
        println!("empty plot: {blank_idat} bytes of image data");
        assert!(idat > blank_idat);
        // Overwrite in place, no temporary left behind.
        plot_loss_curve(&records[..5], &p).unwrap();
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // The fallback used when no system font is available still draws the curve.
        let bare = d.path().join("bare.png");
        let train: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.loss)).collect();
        draw(&bare, &train, &[], false).unwrap();
        let (w, h, bare_idat) = check_png(&std::fs::read(&bare).unwrap());
        println!("unlabelled plot: {bare_idat} bytes of image data");
        assert_eq!((w, h), SIZE);
        assert!(bare_idat > 1_000);
    }
}
