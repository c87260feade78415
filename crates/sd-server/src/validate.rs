//! The checks every request passes before it is queued: limits, sizes, numbers,
//! names resolved only to the configured set, images decoded within limits, A1111's
//! `<lora:name:weight>` tags.

use std::io::Cursor;

use base64::Engine;
use image::DynamicImage;
use sd_schedulers::{SCHEDULER_NAMES, SchedulerName, SigmaSchedule};

use crate::config::Limits;
use crate::error::ApiError;

/// A name a client may use for a model, LoRA or ControlNet: letters, digits, `-`,
/// `_`, `.`, not starting with `.`, at most 128 characters (so never a path).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A1111's schedulers (the sigma schedule beside a sampler): (name, label).
pub const SCHEDULERS: [(&str, &str); 3] = [
    ("automatic", "Automatic"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
];

/// A sampler name (A1111's, an alias, or ours: `euler-a`, `dpmpp-2m-karras`, ...)
/// and an A1111 scheduler (`Automatic`, `Karras`, `Exponential`) as our scheduler
/// name and sigma schedule.
///
/// # Errors
/// Unknown names, listing the known ones.
pub fn resolve_sampler(
    sampler: &str,
    scheduler: Option<&str>,
) -> Result<(String, Option<SigmaSchedule>), ApiError> {
    let key = |s: &str| s.to_ascii_lowercase().replace([' ', '_'], "-");
    let Some(SchedulerName { name: ours, .. }) = SchedulerName::find(sampler) else {
        let known: Vec<&str> = SCHEDULER_NAMES.iter().map(|e| e.a1111).collect();
        return Err(ApiError::invalid(
            "sampler_name",
            format!("unknown sampler `{sampler}`; known: {}", known.join(", ")),
        ));
    };
    let schedule = match scheduler.map(key).as_deref() {
        None | Some("automatic") | Some("") => None,
        Some("karras") if *ours == "dpmpp-2m" => return Ok(("dpmpp-2m-karras".into(), None)),
        Some("karras") if *ours == "dpmpp-2m-karras" => None,
        Some("karras") => Some(SigmaSchedule::karras()),
        Some("exponential") => Some(SigmaSchedule::Exponential),
        Some(other) => {
            return Err(ApiError::invalid(
                "scheduler",
                format!(
                    "unknown scheduler `{other}`; known: {}",
                    SCHEDULERS.map(|(_, l)| l).join(", ")
                ),
            ));
        }
    };
    Ok((ours.to_string(), schedule))
}

/// Checks a picture size against the limits: sides positive multiples of 8, at most
/// `max_side`, at most `max_pixels` in all.
///
/// # Errors
/// [`ApiError::Invalid`] naming `param`.
pub fn check_size(
    width: i64,
    height: i64,
    limits: &Limits,
    param: &str,
) -> Result<(usize, usize), ApiError> {
    for (side, v) in [("width", width), ("height", height)] {
        if v <= 0 || v % 8 != 0 {
            return Err(ApiError::invalid(
                param,
                format!("{side} {v}: must be a positive multiple of 8"),
            ));
        }
        if v as u64 > limits.max_side as u64 {
            return Err(ApiError::invalid(
                param,
                format!("{side} {v}: at most {}", limits.max_side),
            ));
        }
    }
    let (w, h) = (width as usize, height as usize);
    if w * h > limits.max_pixels {
        return Err(ApiError::invalid(
            param,
            format!("{w}x{h} is over the limit of {} pixels", limits.max_pixels),
        ));
    }
    Ok((w, h))
}

/// OpenAI's `size`: `"WxH"` (or `"auto"`: the model's size).
///
/// # Errors
/// Anything else, or a size [`check_size`] refuses.
pub fn parse_size(text: &str, limits: &Limits) -> Result<Option<(usize, usize)>, ApiError> {
    if text == "auto" {
        return Ok(None);
    }
    let bad = || {
        ApiError::invalid(
            "size",
            format!("`{text}`: expected WIDTHxHEIGHT, e.g. 512x512"),
        )
    };
    let (w, h) = text.split_once('x').ok_or_else(bad)?;
    let w: i64 = w.trim().parse().map_err(|_| bad())?;
    let h: i64 = h.trim().parse().map_err(|_| bad())?;
    check_size(w, h, limits, "size").map(Some)
}

/// Checks a count lies in `1..=max`.
fn check_count(v: i64, max: usize, param: &str) -> Result<usize, ApiError> {
    if v < 1 || v as u64 > max as u64 {
        return Err(ApiError::invalid(
            param,
            format!("{v}: between 1 and {max}"),
        ));
    }
    Ok(v as usize)
}

/// Checks a step count.
///
/// # Errors
/// Zero, negative or over `max_steps`.
pub fn check_steps(steps: i64, limits: &Limits, param: &str) -> Result<usize, ApiError> {
    check_count(steps, limits.max_steps, param)
}

/// Checks an image count.
///
/// # Errors
/// Zero, negative or over `max_images`.
pub fn check_images(n: i64, limits: &Limits, param: &str) -> Result<usize, ApiError> {
    check_count(n, limits.max_images, param)
}

/// Checks a number lies in `[lo, hi]` (finite).
///
/// # Errors
/// Outside, or not finite.
pub fn check_range(v: f64, lo: f64, hi: f64, param: &str) -> Result<f64, ApiError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(ApiError::invalid(
            param,
            format!("{v}: between {lo} and {hi}"),
        ));
    }
    Ok(v)
}

/// Checks a prompt's length; `required` refuses an empty one.
///
/// # Errors
/// Empty when required, or over `max_prompt_chars`.
pub fn check_prompt(
    text: &str,
    limits: &Limits,
    param: &str,
    required: bool,
) -> Result<(), ApiError> {
    if required && text.trim().is_empty() {
        return Err(ApiError::invalid(param, "must not be empty"));
    }
    if text.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            param,
            format!("over {} characters", limits.max_prompt_chars),
        ));
    }
    Ok(())
}

/// A seed: `-1` (or none) draws one.
pub fn seed(seed: Option<i64>) -> u64 {
    match seed {
        Some(s) if s >= 0 => s as u64,
        _ => rand::random::<u32>() as u64,
    }
}

/// Decodes an image sent as base64 (a `data:` URL prefix allowed), within the pixel
/// limit.
///
/// # Errors
/// Base64 that does not decode, bytes that are no PNG/JPEG/WebP picture, a picture
/// over the limit.
pub fn decode_base64_image(
    text: &str,
    limits: &Limits,
    param: &str,
) -> Result<DynamicImage, ApiError> {
    let data = text
        .split_once(";base64,")
        .filter(|(head, _)| head.starts_with("data:"))
        .map_or(text, |(_, d)| d);
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| ApiError::invalid(param, format!("not valid base64: {e}")))?;
    decode_image(&bytes, limits, param)
}

/// Decodes image bytes (PNG, JPEG, WebP, GIF) within the pixel limit.
///
/// # Errors
/// As [`decode_base64_image`].
pub fn decode_image(bytes: &[u8], limits: &Limits, param: &str) -> Result<DynamicImage, ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(param, format!("unreadable image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::invalid(
            param,
            "not a PNG, JPEG, WebP or GIF image",
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(param, format!("unreadable image: {e}")))?;
    if w == 0 || h == 0 || (w as u64) * (h as u64) > limits.max_pixels as u64 {
        return Err(ApiError::invalid(
            param,
            format!(
                "a {w}x{h} image: over the limit of {} pixels",
                limits.max_pixels
            ),
        ));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(param, format!("unreadable image: {e}")))?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side.max(w as usize) as u32);
    l.max_image_height = Some(limits.max_side.max(h as usize) as u32);
    reader.limits(l);
    reader
        .decode()
        .map_err(|e| ApiError::invalid(param, format!("unreadable image: {e}")))
}

/// A1111's extra-network tags: `<lora:name>`, `<lora:name:0.8>` (and `<lora:name:te:unet>`
/// with equal weights) taken out of the prompt; other networks' tags are taken out
/// and logged, as A1111 does with networks it does not have.
///
/// # Errors
/// A weight that is not a finite number, different text-encoder and U-Net weights.
pub fn extract_loras(prompt: &str) -> Result<(String, Vec<(String, f32)>), ApiError> {
    let mut clean = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let tag = after.find('>').map(|close| &after[..close]).and_then(|t| {
            let (kind, args) = t.split_once(':')?;
            let word = !kind.is_empty() && kind.chars().all(|c| c.is_alphanumeric() || c == '_');
            (word && !args.is_empty()).then_some((kind, args, t.len()))
        });
        let Some((kind, args, len)) = tag else {
            clean.push_str(&rest[..=open]);
            rest = after;
            continue;
        };
        clean.push_str(&rest[..open]);
        rest = &after[len + 1..];
        if kind != "lora" {
            tracing::warn!(
                network = kind,
                "extra network type not supported; tag removed"
            );
            continue;
        }
        let items: Vec<&str> = args.split(':').map(str::trim).collect();
        let weight = |s: &str| -> Result<f32, ApiError> {
            let s = s.strip_prefix("te=").unwrap_or(s);
            s.parse::<f32>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| {
                    ApiError::invalid("prompt", format!("<lora:{args}>: `{s}` is not a weight"))
                })
        };
        let te = items.get(1).map(|s| weight(s)).transpose()?.unwrap_or(1.0);
        if let Some(unet) = items
            .get(2)
            .map(|s| weight(s.strip_prefix("unet=").unwrap_or(s)))
            .transpose()?
            && unet != te
        {
            return Err(ApiError::invalid(
                "prompt",
                format!("<lora:{args}>: separate text-encoder and U-Net weights are not supported"),
            ));
        }
        loras.push((items[0].to_string(), te));
    }
    clean.push_str(rest);
    Ok((clean, loras))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_as_a1111_parses_them() {
        let (p, l) =
            extract_loras("a cat <lora:pixel:0.7>, <lora:ink> in <b>bold</b> <hypernet:x:1>")
                .unwrap();
        assert_eq!(p, "a cat ,  in <b>bold</b> ");
        assert_eq!(l, vec![("pixel".into(), 0.7), ("ink".into(), 1.0)]);
        assert!(extract_loras("<lora:x:abc>").is_err());
        assert!(extract_loras("<lora:x:0.5:1.0>").is_err());
        assert_eq!(extract_loras("<lora:x:0.5:0.5>").unwrap().1[0].1, 0.5);
        assert_eq!(extract_loras("a < b > c").unwrap().0, "a < b > c");
    }

    #[test]
    fn samplers_by_a1111_and_our_names() {
        assert_eq!(resolve_sampler("Euler a", None).unwrap().0, "euler-a");
        assert_eq!(resolve_sampler("k_euler_a", None).unwrap().0, "euler-a");
        assert_eq!(
            resolve_sampler("DPM++ 2M", Some("Karras")).unwrap().0,
            "dpmpp-2m-karras"
        );
        assert_eq!(
            resolve_sampler("dpmpp-2m-karras", Some("Automatic"))
                .unwrap()
                .0,
            "dpmpp-2m-karras"
        );
        let (s, schedule) = resolve_sampler("Euler", Some("karras")).unwrap();
        assert_eq!(
            (s.as_str(), schedule),
            ("euler", Some(SigmaSchedule::karras()))
        );
        // SD 3's flow Heun (a flow-only name: SD 1.x / XL jobs fail with the pipeline's words).
        assert_eq!(resolve_sampler("Heun", None).unwrap().0, "heun");
        assert!(resolve_sampler("DPM2", None).is_err());
        assert!(resolve_sampler("Euler", Some("sgm_uniform")).is_err());
    }

    #[test]
    fn sizes_and_names() {
        let l = Limits::default();
        assert_eq!(parse_size("512x768", &l).unwrap(), Some((512, 768)));
        assert_eq!(parse_size("auto", &l).unwrap(), None);
        for bad in ["0x0", "7x7", "100000x8", "512", "axb", "-8x8", "8x8x8"] {
            assert!(parse_size(bad, &l).is_err(), "{bad}");
        }
        assert!(is_plain_name("sd-1.5_base"));
        for bad in ["", "../x", ".hidden", "a/b", "a\\b", "c:"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }
}
