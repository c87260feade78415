//! Tiled VAE decoding and encoding, as diffusers' `AutoencoderKL.enable_tiling()`:
//! the input is cut into tiles of the VAE's `sample_size` (512 pixels for SD 1.5,
//! 64 latents) overlapping by a quarter, each tile runs through the decoder
//! (encoder) alone, and neighbouring outputs are blended linearly over the overlap,
//! top then left, in row-major order. Memory then depends on the tile size, not the
//! image size, and the mid-block attention stays within a tile.

use burn::prelude::*;

/// When [`crate::AutoencoderKL`] works in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeTiling {
    /// Never: the whole image at once (diffusers' default).
    Off,
    /// Whenever the image is larger than one tile (diffusers with `enable_tiling()`).
    On,
    /// Only when the image has more than `max_pixels` pixels; smaller images are
    /// processed whole, exactly as diffusers does by default.
    Auto {
        /// Largest image (height x width, in pixels) processed whole.
        max_pixels: usize,
    },
}

impl Default for VaeTiling {
    /// `Auto` above 1024x1024 pixels: SD sizes up to 1024x1024 match diffusers
    /// exactly, larger images decode in bounded memory.
    fn default() -> Self {
        VaeTiling::Auto {
            max_pixels: 1024 * 1024,
        }
    }
}

impl VaeTiling {
    /// Whether an image of `height x width` pixels is processed in tiles of
    /// `tile_pixels` on a side.
    pub fn applies(&self, height: usize, width: usize, tile_pixels: usize) -> bool {
        let larger = height > tile_pixels || width > tile_pixels;
        match *self {
            VaeTiling::Off => false,
            VaeTiling::On => larger,
            VaeTiling::Auto { max_pixels } => larger && height * width > max_pixels,
        }
    }
}

/// diffusers' tile overlap (`tile_overlap_factor`).
pub const TILE_OVERLAP: f64 = 0.25;

/// How an input is cut and its outputs stitched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TilePlan {
    /// Tile size on the input side.
    pub tile_in: usize,
    /// Step between tile origins on the input side.
    pub stride_in: usize,
    /// Overlap blended on the output side.
    pub blend: usize,
    /// Rows / columns kept of each output tile.
    pub keep: usize,
}

impl TilePlan {
    /// `tile_in` inputs map to `tile_out` outputs (decode: latents to pixels).
    pub fn new(tile_in: usize, tile_out: usize) -> Self {
        let blend = (tile_out as f64 * TILE_OVERLAP) as usize;
        Self {
            tile_in,
            stride_in: ((tile_in as f64 * (1.0 - TILE_OVERLAP)) as usize).max(1),
            blend,
            keep: tile_out - blend,
        }
    }

    /// Runs `f` on every tile of `x` and stitches the outputs.
    ///
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; `f` maps a tile `[b, c, th, tw]` to `[b, c', th * s, tw * s]`
    pub fn run(&self, x: Tensor<4>, mut f: impl FnMut(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let starts = |n: usize| (0..n).step_by(self.stride_in).collect::<Vec<_>>();
        let (rows, cols) = (starts(h), starts(w));
        let mut grid: Vec<Vec<Tensor<4>>> = Vec::with_capacity(rows.len());
        for &i in &rows {
            let mut row = Vec::with_capacity(cols.len());
            for &j in &cols {
                let tile = x.clone().slice([
                    0..b,
                    0..c,
                    i..(i + self.tile_in).min(h),
                    j..(j + self.tile_in).min(w),
                ]);
                row.push(f(tile));
            }
            grid.push(row);
        }
        // Blend in place, row-major, as diffusers does: a tile is blended with the
        // already-blended tiles above and to its left.
        for i in 0..grid.len() {
            for j in 0..grid[i].len() {
                let mut tile = grid[i][j].clone();
                if i > 0 {
                    tile = blend(&grid[i - 1][j], tile, self.blend, 2);
                }
                if j > 0 {
                    tile = blend(&grid[i][j - 1], tile, self.blend, 3);
                }
                grid[i][j] = tile;
            }
        }
        let rows_out: Vec<Tensor<4>> = grid
            .into_iter()
            .map(|row| {
                let kept: Vec<Tensor<4>> = row
                    .into_iter()
                    .map(|t| {
                        let [tb, tc, th, tw] = t.dims();
                        t.slice([0..tb, 0..tc, 0..th.min(self.keep), 0..tw.min(self.keep)])
                    })
                    .collect();
                Tensor::cat(kept, 3)
            })
            .collect();
        Tensor::cat(rows_out, 2)
    }
}

/// diffusers' `blend_v` (`axis` 2) / `blend_h` (`axis` 3): the first `extent` rows
/// (columns) of `b` become `a`'s last ones weighted `1 - y / extent` plus `b`'s
/// weighted `y / extent`.
fn blend(a: &Tensor<4>, b: Tensor<4>, extent: usize, axis: usize) -> Tensor<4> {
    let (da, db) = (a.dims(), b.dims());
    let e = extent.min(da[axis]).min(db[axis]);
    if e == 0 {
        return b;
    }
    let device = b.device();
    let ramp: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[axis] = e;
    let weight = crate::norm::to_dtype(
        Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape(shape),
        b.dtype(),
    );
    let range = |d: [usize; 4], lo: usize, hi: usize| {
        let mut r = [0..d[0], 0..d[1], 0..d[2], 0..d[3]];
        r[axis] = lo..hi;
        r
    };
    let a_tail = a.clone().slice(range(da, da[axis] - e, da[axis]));
    let b_head = b.clone().slice(range(db, 0, e));
    let head = a_tail * (weight.clone().neg() + 1.0) + b_head * weight;
    if e == db[axis] {
        head
    } else {
        Tensor::cat(vec![head, b.slice(range(db, e, db[axis]))], axis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_tiles_stitch_back_to_the_input() {
        let device = Device::default();
        let x = Tensor::<4>::random(
            [1, 2, 150, 97],
            burn::tensor::Distribution::Default,
            &device,
        );
        // An identity "decoder": overlapping copies blend to themselves.
        let plan = TilePlan::new(64, 64);
        let y = plan.run(x.clone(), |t| t);
        assert_eq!(y.dims(), x.dims());
        let err: f32 = (y - x).abs().max().into_scalar();
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn plans_follow_diffusers() {
        // SD 1.5 decode: 64-latent tiles every 48 latents, 128 pixels blended, 384 kept.
        let p = TilePlan::new(64, 512);
        assert_eq!((p.stride_in, p.blend, p.keep), (48, 128, 384));
        // Encode: 512-pixel tiles every 384 pixels, 16 latents blended, 48 kept.
        let p = TilePlan::new(512, 64);
        assert_eq!((p.stride_in, p.blend, p.keep), (384, 16, 48));
        assert!(!VaeTiling::default().applies(1024, 1024, 512));
        assert!(VaeTiling::default().applies(1024, 1032, 512));
        assert!(VaeTiling::On.applies(520, 512, 512));
        assert!(!VaeTiling::Off.applies(4096, 4096, 512));
    }
}
