//! OpenPose keypoints (the JSON A1111's and ComfyUI's pose editors exchange) drawn
//! as the standard coloured skeleton of the openpose ControlNets: 17 limbs as
//! ellipses at 60 % colour, then 18 keypoints as discs, on black (lllyasviel's
//! `draw_bodypose`).

use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_polygon_mut};
use imageproc::point::Point;
use serde_json::Value;

use crate::error::PipelineError;

/// The 18 COCO body keypoints of one person, in pixels, `None` where not seen.
#[derive(Debug, Clone, PartialEq)]
pub struct PoseKeypoints(pub [Option<(f32, f32)>; 18]);

/// An OpenPose file: the canvas and its people.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenPose {
    /// Canvas width in pixels.
    pub width: u32,
    /// Canvas height in pixels.
    pub height: u32,
    /// One skeleton per person.
    pub people: Vec<PoseKeypoints>,
}

/// Limbs as pairs of keypoints (1-based, as the original `limbSeq`).
const LIMBS: [[usize; 2]; 17] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
];

const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

impl OpenPose {
    /// Parses the OpenPose JSON: `canvas_width`, `canvas_height` and `people[i].
    /// pose_keypoints_2d` = 18 `(x, y, confidence)` triples in pixels (or in
    /// `[0, 1]` of the canvas when every coordinate is; confidence 0 = not seen).
    ///
    /// # Errors
    /// JSON that does not parse or lacks those fields, a keypoint list that is not
    /// 18 triples.
    pub fn from_json(text: &str) -> Result<Self, PipelineError> {
        let bad = |m: String| PipelineError::request("pose", m);
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let v = match v {
            Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
            v => v,
        };
        let dim = |k: &str| {
            v[k].as_u64()
                .filter(|d| (1..=16384).contains(d))
                .map(|d| d as u32)
                .ok_or_else(|| bad(format!("`{k}` missing or out of 1..=16384")))
        };
        let (width, height) = (dim("canvas_width")?, dim("canvas_height")?);
        let people = v["people"]
            .as_array()
            .ok_or_else(|| bad("`people` missing".into()))?
            .iter()
            .map(|p| parse_person(&p["pose_keypoints_2d"], width, height).map_err(bad))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            width,
            height,
            people,
        })
    }
}

fn parse_person(v: &Value, width: u32, height: u32) -> Result<PoseKeypoints, String> {
    let values: Vec<f64> = v
        .as_array()
        .ok_or("`pose_keypoints_2d` missing")?
        .iter()
        .map(|x| x.as_f64().ok_or("a keypoint value is not a number"))
        .collect::<Result<_, _>>()?;
    if values.len() != 54 {
        return Err(format!(
            "{} values in pose_keypoints_2d, expected 18 (x, y, confidence) triples",
            values.len()
        ));
    }
    let normalised = values
        .chunks(3)
        .all(|k| k[2] <= 0.0 || (k[0] <= 1.0 && k[1] <= 1.0));
    let (sx, sy) = if normalised {
        (width as f64, height as f64)
    } else {
        (1.0, 1.0)
    };
    let mut points = [None; 18];
    for (p, k) in points.iter_mut().zip(values.chunks(3)) {
        if k[2] > 0.0 && k[0].is_finite() && k[1].is_finite() {
            *p = Some(((k[0] * sx) as f32, (k[1] * sy) as f32));
        }
    }
    Ok(PoseKeypoints(points))
}

/// The skeletons of `pose` on a black canvas of its size.
pub fn draw_openpose(pose: &OpenPose) -> RgbImage {
    let mut canvas = RgbImage::new(pose.width, pose.height);
    for (limb, color) in LIMBS.iter().zip(COLORS) {
        let dim = Rgb(color.map(|c| (c as f32 * 0.6) as u8));
        for person in &pose.people {
            if let (Some(a), Some(b)) = (person.0[limb[0] - 1], person.0[limb[1] - 1]) {
                draw_limb(&mut canvas, a, b, dim);
            }
        }
    }
    for (i, color) in COLORS.iter().enumerate() {
        for person in &pose.people {
            if let Some((x, y)) = person.0[i] {
                draw_filled_circle_mut(&mut canvas, (x as i32, y as i32), 4, Rgb(*color));
            }
        }
    }
    canvas
}

/// An ellipse 4 pixels wide from `a` to `b` (`cv2.ellipse2Poly` + `fillConvexPoly`).
fn draw_limb(canvas: &mut RgbImage, a: (f32, f32), b: (f32, f32), color: Rgb<u8>) {
    let (cx, cy) = ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0);
    let half = ((a.0 - b.0).hypot(a.1 - b.1) / 2.0).max(1.0);
    let angle = (b.1 - a.1).atan2(b.0 - a.0);
    let (sin, cos) = angle.sin_cos();
    let mut poly: Vec<Point<i32>> = Vec::with_capacity(36);
    for deg in (0..360).step_by(10) {
        let t = (deg as f32).to_radians();
        let (ex, ey) = (half * t.cos(), 4.0 * t.sin());
        let p = Point::new(
            (cx + ex * cos - ey * sin).round() as i32,
            (cy + ex * sin + ey * cos).round() as i32,
        );
        if poly.last() != Some(&p) {
            poly.push(p);
        }
    }
    while poly.len() > 1 && poly.first() == poly.last() {
        poly.pop();
    }
    if poly.len() >= 3 {
        draw_polygon_mut(canvas, &poly, color);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person() -> String {
        let mut k = vec![0.0f64; 54];
        // Nose, neck and the right shoulder.
        for (i, (x, y)) in [(0, (32.0, 10.0)), (1, (32.0, 24.0)), (2, (20.0, 24.0))] {
            k[3 * i] = x;
            k[3 * i + 1] = y;
            k[3 * i + 2] = 1.0;
        }
        serde_json::json!({
            "canvas_width": 64, "canvas_height": 48,
            "people": [{"pose_keypoints_2d": k}]
        })
        .to_string()
    }

    #[test]
    fn skeletons_are_drawn_in_the_standard_colours() {
        let pose = OpenPose::from_json(&person()).unwrap();
        assert_eq!(pose.people.len(), 1);
        assert_eq!(pose.people[0].0[3], None);
        let img = draw_openpose(&pose);
        assert_eq!(img.dimensions(), (64, 48));
        // Keypoint discs in full colour: the nose red, the neck orange.
        assert_eq!(img.get_pixel(32, 10).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(32, 24).0, [255, 85, 0]);
        // The neck-to-shoulder limb (limb 0) at 60 % red.
        assert_eq!(img.get_pixel(26, 24).0, [153, 0, 0]);
        assert_eq!(img.get_pixel(60, 44).0, [0, 0, 0]);
    }

    #[test]
    fn bad_pose_files_are_errors() {
        assert!(OpenPose::from_json("{").is_err());
        assert!(OpenPose::from_json(r#"{"canvas_width": 8, "canvas_height": 8}"#).is_err());
        let short = r#"{"canvas_width": 8, "canvas_height": 8, "people": [{"pose_keypoints_2d": [1, 2, 1]}]}"#;
        assert!(
            OpenPose::from_json(short)
                .unwrap_err()
                .to_string()
                .contains("18")
        );
    }
}
