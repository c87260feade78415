//! Watching a run: the CSV log, the loss-curve PNG and grids of sample images.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::error::TrainError;

/// One row of the training log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRow {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch (passes over the training split) the step belongs to.
    pub epoch: usize,
    /// Training loss of the step (mean over its micro-batches).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Optimizer steps per second, over the steps since the previous row.
    pub steps_per_s: f64,
    /// Validation loss, when measured at this step.
    pub val_loss: Option<f64>,
}

/// `log.csv`: appends rows, with a header when the file is new (a resumed run keeps
/// appending to its log).
#[derive(Debug)]
pub struct CsvLog {
    path: PathBuf,
    rows: Vec<LogRow>,
}

/// The CSV header.
pub const CSV_HEADER: &str = "step,epoch,loss,lr,grad_norm,steps_per_s,val_loss";

impl CsvLog {
    /// Opens (creating with a header) `path`. Rows after `resume_step` are dropped,
    /// so a run resumed from a checkpoint does not log steps twice.
    pub fn open(path: impl Into<PathBuf>, resume_step: usize) -> Result<Self, TrainError> {
        let path = path.into();
        let rows: Vec<LogRow> = match std::fs::read_to_string(&path) {
            Ok(text) => parse_rows(&text)
                .into_iter()
                .filter(|r| r.step <= resume_step)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut text = String::from(CSV_HEADER);
        text.push('\n');
        for row in &rows {
            text.push_str(&format_row(row));
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| TrainError::file(&path, e))?;
        Ok(Self { path, rows })
    }

    /// Appends a row.
    pub fn append(&mut self, row: &LogRow) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| TrainError::file(&self.path, e))?;
        writeln!(f, "{}", format_row(row)).map_err(|e| TrainError::file(&self.path, e))?;
        self.rows.push(*row);
        Ok(())
    }

    /// Every row of the log, as written.
    pub fn rows(&self) -> &[LogRow] {
        &self.rows
    }
}

fn format_row(row: &LogRow) -> String {
    let val = row.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
    format!(
        "{},{},{:.6},{:.3e},{:.4},{:.3},{}",
        row.step, row.epoch, row.loss, row.lr, row.grad_norm, row.steps_per_s, val
    )
}

/// Parses a `log.csv`.
pub fn read_log(path: &Path) -> Result<Vec<LogRow>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
    Ok(parse_rows(&text))
}

/// The rows of a log's text (after the header); malformed lines are skipped.
fn parse_rows(text: &str) -> Vec<LogRow> {
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 7 {
            continue;
        }
        let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
        rows.push(LogRow {
            step: f[0].parse().unwrap_or(0),
            epoch: f[1].parse().unwrap_or(0),
            loss: num(f[2]),
            lr: num(f[3]),
            grad_norm: num(f[4]),
            steps_per_s: num(f[5]),
            val_loss: (!f[6].is_empty()).then(|| num(f[6])),
        });
    }
    rows
}

/// Draws the loss curve (training loss light blue, its bias-corrected running mean
/// (0.9 per row) dark blue,
/// validation loss red) over steps into an RGB image of `width` x `height`, on a log
/// scale with a grid line per decade.
pub fn plot_losses(rows: &[LogRow], width: usize, height: usize) -> Vec<u8> {
    let mut img = vec![255u8; width * height * 3];
    let (ml, mr, mt, mb) = (40usize, 16usize, 16usize, 28usize);
    let (pw, ph) = (
        width.saturating_sub(ml + mr).max(1),
        height.saturating_sub(mt + mb).max(1),
    );
    let put = |img: &mut Vec<u8>, x: usize, y: usize, c: [u8; 3]| {
        if x < width && y < height {
            let i = (y * width + x) * 3;
            img[i..i + 3].copy_from_slice(&c);
        }
    };
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|r| [Some(r.loss), r.val_loss])
        .flatten()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    // Frame.
    for x in ml..=ml + pw {
        put(&mut img, x, mt + ph, [0, 0, 0]);
    }
    for y in mt..=mt + ph {
        put(&mut img, ml, y, [0, 0, 0]);
    }
    if values.is_empty() {
        return img;
    }
    let lo = values
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = values
        .iter()
        .cloned()
        .fold(0.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let max_step = rows.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let min_step = rows.iter().map(|r| r.step).min().unwrap_or(0) as f64;
    let sx = |s: usize| {
        ml + ((s as f64 - min_step) / (max_step - min_step).max(1.0) * pw as f64) as usize
    };
    let sy =
        |v: f64| mt + ((hi - v.log10()) / (hi - lo) * ph as f64).clamp(0.0, ph as f64) as usize;
    // Decade grid lines with a tick mark per decade.
    let mut d = lo;
    while d <= hi {
        let y = sy(10f64.powf(d));
        for x in (ml..=ml + pw).step_by(3) {
            put(&mut img, x, y, [200, 200, 200]);
        }
        for x in ml - 6..ml {
            put(&mut img, x, y, [0, 0, 0]);
        }
        d += 1.0;
    }
    let line = |img: &mut Vec<u8>, a: (usize, usize), b: (usize, usize), c: [u8; 3]| {
        let n = (a.0.abs_diff(b.0)).max(a.1.abs_diff(b.1)).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let x = a.0 as f64 + (b.0 as f64 - a.0 as f64) * t;
            let y = a.1 as f64 + (b.1 as f64 - a.1 as f64) * t;
            put(img, x.round() as usize, y.round() as usize, c);
        }
    };
    let mut prev = None;
    let mut mean = None;
    let mut prev_mean = None;
    for r in rows.iter().filter(|r| r.loss.is_finite() && r.loss > 0.0) {
        let p = (sx(r.step), sy(r.loss));
        if let Some(q) = prev {
            line(&mut img, q, p, [160, 190, 235]);
        }
        prev = Some(p);
        // Bias-corrected running mean (as Adam's moments): no lag from a start at 0.
        let (m, k) = mean.unwrap_or((0.0, 0));
        let (m, k) = (0.9 * m + 0.1 * r.loss, k + 1);
        mean = Some((m, k));
        let pm = (sx(r.step), sy(m / (1.0 - 0.9f64.powi(k))));
        if let Some(q) = prev_mean {
            line(&mut img, q, pm, [20, 60, 160]);
        }
        prev_mean = Some(pm);
    }
    let mut prev = None;
    for r in rows {
        let Some(v) = r.val_loss.filter(|v| v.is_finite() && *v > 0.0) else {
            continue;
        };
        let p = (sx(r.step), sy(v));
        if let Some(q) = prev {
            line(&mut img, q, p, [210, 40, 40]);
        }
        for dx in 0..3 {
            for dy in 0..3 {
                put(&mut img, p.0 + dx - 1, p.1 + dy - 1, [210, 40, 40]);
            }
        }
        prev = Some(p);
    }
    img
}

/// Writes [`plot_losses`] of `rows` as a PNG.
pub fn write_loss_plot(path: &Path, rows: &[LogRow]) -> Result<(), TrainError> {
    let (w, h) = (720, 400);
    let rgb = plot_losses(rows, w, h);
    sd_io::image::write_png_rgb8(path, w, h, &rgb, None).map_err(TrainError::from)
}

/// Tiles images `[n, 3, h, w]` in `[0, 1]` into a grid `columns` wide, as RGB bytes;
/// returns `(width, height, rgb)`.
pub fn image_grid(images: &Tensor<4>, columns: usize) -> (usize, usize, Vec<u8>) {
    let [n, _, h, w] = images.dims();
    let columns = columns.clamp(1, n.max(1));
    let rows = n.div_ceil(columns);
    let (gw, gh) = (columns * w, rows * h);
    let mut out = vec![0u8; gw * gh * 3];
    for i in 0..n {
        let (_, _, rgb) = sd_io::image::to_rgb8(images, i);
        let (ox, oy) = ((i % columns) * w, (i / columns) * h);
        for y in 0..h {
            let dst = ((oy + y) * gw + ox) * 3;
            out[dst..dst + w * 3].copy_from_slice(&rgb[y * w * 3..(y + 1) * w * 3]);
        }
    }
    (gw, gh, out)
}
