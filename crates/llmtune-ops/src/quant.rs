//! Quantized matrix products for inference straight from GGUF weights.
//!
//! A [`QMatrix`] keeps a `[rows, cols]` weight in GGML's own block layout (`Q4_1` or `Q8_0`,
//! 32 weights per block) and computes `y = x W^T` for `m` input rows as llama.cpp's CPU
//! backend does: each input row is quantized once per product to 8-bit blocks
//! ([`BlockQ8`]: scale, scaled sum, 32 `i8`), and each output is a sum over blocks of an
//! exact integer dot product times the two scales:
//!
//! * `Q4_1 x Q8`: `d_w d_x sum(q_w q_x) + m_w s_x` (`w = d_w q_w + m_w`, `s_x = d_x sum(q_x)`),
//! * `Q8_0 x Q8`: `d_w d_x sum(q_w q_x)`.
//!
//! The integer dot products run with AVX-512-VNNI or AVX-VNNI (`vpdpbusd`), AVX2
//! (`vpmaddubsw`) or plain Rust, picked once at run time with `is_x86_feature_detected!`
//! (`LLMTUNE_OPS_NO_SIMD=1` forces plain Rust). All of them give the same integer block sums;
//! only the order of the float additions differs. Output rows are split over rayon's worker
//! pool (`LLMTUNE_QUANT_POOL=candle`: candle's spinning pool instead).
//!
//! This is an inference path: there is no backward.

use half::f16;

/// Weights per block for every format here.
pub const QK: usize = 32;

/// GGML `block_q4_1`: `w = d * q + m`, `q` in `0..16`; `qs[j]` holds weight `j` in its low
/// nibble and weight `j + 16` in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// GGML `block_q8_0`: `w = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// An activation block: `x ~ d * q`, and `s = d * sum(q)` (for formats with an offset).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// The weight formats with kernels here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    Q4_1,
    Q8_0,
}

impl QFormat {
    /// Bytes per block of 32 weights in GGML's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

#[derive(Clone, Debug)]
enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A quantized `[rows, cols]` matrix (row-major, `cols / 32` blocks per row).
#[derive(Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
    /// The same weights repacked for AVX-512-VNNI: 16 rows interleaved per block of 32
    /// columns (built when this CPU has it and `rows % 16 == 0`).
    tiles: Option<Tiles>,
}

/// Rows per tile of the repacked layout.
pub const TILE: usize = 16;

/// 16 rows x 32 columns of Q4_1: `qs[64 g + 4 r + j]` holds weight `4 g + j` of row `r`
/// in its low nibble and weight `4 (g + 4) + j` in its high nibble (`g` in `0..4`), so that
/// one `vpdpbusd` against 4 broadcast activation bytes gives 16 rows' partial sums.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TileQ4_1 {
    qs: [u8; 256],
    d: [f16; TILE],
    m: [f16; TILE],
}

/// 16 rows x 32 columns of Q8_0: `qs[64 g + 4 r + j]` is weight `4 g + j` of row `r`
/// (`g` in `0..8`); `wsum[r]` is the sum of row `r`'s 32 weights (the activations enter
/// `vpdpbusd` as unsigned bytes `x + 128`, and `128 * wsum` is taken back off).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TileQ8_0 {
    qs: [i8; 512],
    wsum: [i32; TILE],
    d: [f16; TILE],
}

#[derive(Clone)]
enum Tiles {
    Q4_1(Vec<TileQ4_1>),
    Q8_0(Vec<TileQ8_0>),
}

fn nibble(b: &BlockQ4_1, k: usize) -> u8 {
    if k < QK / 2 {
        b.qs[k] & 0x0f
    } else {
        b.qs[k - QK / 2] >> 4
    }
}

/// Tile `t`, column block `b` index: tiles are stored tile-major (`t * bpr + b`).
fn pack_tiles(blocks: &Blocks, rows: usize, cols: usize) -> Option<Tiles> {
    if !rows.is_multiple_of(TILE) || detect_isa() != QIsa::Avx512Vnni {
        return None;
    }
    let bpr = cols / QK;
    let n_tiles = rows / TILE;
    Some(match blocks {
        Blocks::Q4_1(v) => {
            let mut out = Vec::with_capacity(n_tiles * bpr);
            for t in 0..n_tiles {
                for b in 0..bpr {
                    let mut tile = TileQ4_1 {
                        qs: [0; 256],
                        d: [f16::ZERO; TILE],
                        m: [f16::ZERO; TILE],
                    };
                    for r in 0..TILE {
                        let blk = &v[(t * TILE + r) * bpr + b];
                        tile.d[r] = blk.d;
                        tile.m[r] = blk.m;
                        for g in 0..4 {
                            for j in 0..4 {
                                tile.qs[64 * g + 4 * r + j] =
                                    nibble(blk, 4 * g + j) | (nibble(blk, 4 * (g + 4) + j) << 4);
                            }
                        }
                    }
                    out.push(tile);
                }
            }
            Tiles::Q4_1(out)
        }
        Blocks::Q8_0(v) => {
            let mut out = Vec::with_capacity(n_tiles * bpr);
            for t in 0..n_tiles {
                for b in 0..bpr {
                    let mut tile = TileQ8_0 {
                        qs: [0; 512],
                        wsum: [0; TILE],
                        d: [f16::ZERO; TILE],
                    };
                    for r in 0..TILE {
                        let blk = &v[(t * TILE + r) * bpr + b];
                        tile.d[r] = blk.d;
                        tile.wsum[r] = blk.qs.iter().map(|&q| q as i32).sum();
                        for g in 0..8 {
                            for j in 0..4 {
                                tile.qs[64 * g + 4 * r + j] = blk.qs[4 * g + j];
                            }
                        }
                    }
                    out.push(tile);
                }
            }
            Tiles::Q8_0(out)
        }
    })
}

/// Quantizes `x` (a multiple of 32 long) to 8-bit blocks as GGML's `quantize_row_q8_1`:
/// `d = max|x| / 127`, `q = round(x / d)` (half to even), `s = d * sum(q)`. With AVX-512 (the
/// CPUs with the tiled kernels) 16 lanes at a time, bit-identical to
/// [`quantize_row_q8_scalar`] for finite inputs.
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    quantize_row_q8_with(qisa(), x, out)
}

/// [`quantize_row_q8`] with a given instruction set (one of [`available_isas`]): AVX-512 for
/// `Avx512Vnni`, AVX2 for `Avx2` and `AvxVnni`; the same bits from each for finite inputs.
pub fn quantize_row_q8_with(isa: QIsa, x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q8: lengths");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Avx512Vnni` is detected with AVX-512F/VL, the other two with AVX2.
        QIsa::Avx512Vnni => return unsafe { x86::quantize_row_q8(x, out) },
        QIsa::Avx2 | QIsa::AvxVnni => return unsafe { x86::quantize_row_q8_avx2(x, out) },
        QIsa::Scalar => {}
    }
    quantize_row_q8_scalar(x, out)
}

/// [`quantize_row_q8`] in plain Rust (the reference of the SIMD version).
pub fn quantize_row_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q8: lengths");
    for (chunk, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            // Round half to even without a libm call (|v * id| <= 127 < 2^22), as GGML's
            // SIMD quantizers do.
            let r = ((v * id + 12_582_912.0) - 12_582_912.0) as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Which integer dot-product instructions this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QIsa {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

/// The instruction set the kernels use on this CPU (detected once).
pub fn qisa() -> QIsa {
    use std::sync::OnceLock;
    static ISA: OnceLock<QIsa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("LLMTUNE_OPS_NO_SIMD").is_some() {
            return QIsa::Scalar;
        }
        detect_isa()
    })
}

fn detect_isa() -> QIsa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            return QIsa::Avx512Vnni;
        }
        if avx2 && is_x86_feature_detected!("avxvnni") {
            return QIsa::AvxVnni;
        }
        if avx2 {
            return QIsa::Avx2;
        }
    }
    QIsa::Scalar
}

// ---------------------------------------------------------------------------------------
// Plain-Rust dot products (the reference and the fallback).

/// Integer dot product of a Q4_1 block with an activation block.
#[inline]
pub fn block_dot_q4_1(w: &BlockQ4_1, x: &BlockQ8) -> i32 {
    let mut s = 0i32;
    for j in 0..QK / 2 {
        let lo = (w.qs[j] & 0x0f) as i32;
        let hi = (w.qs[j] >> 4) as i32;
        s += lo * x.qs[j] as i32 + hi * x.qs[j + QK / 2] as i32;
    }
    s
}

/// Integer dot product of a Q8_0 block with an activation block.
#[inline]
pub fn block_dot_q8_0(w: &BlockQ8_0, x: &BlockQ8) -> i32 {
    w.qs.iter()
        .zip(&x.qs)
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

/// One output of `Q4_1 x Q8` in plain Rust.
pub fn dot_q4_1_scalar(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (w, x) in w.iter().zip(x) {
        let q = block_dot_q4_1(w, x) as f32;
        acc += w.d.to_f32() * x.d * q + w.m.to_f32() * x.s;
    }
    acc
}

/// One output of `Q8_0 x Q8` in plain Rust.
pub fn dot_q8_0_scalar(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (w, x) in w.iter().zip(x) {
        acc += w.d.to_f32() * x.d * block_dot_q8_0(w, x) as f32;
    }
    acc
}

// ---------------------------------------------------------------------------------------
// x86-64 kernels. Each computes the 8 partial i32 sums of one block pair in a __m256i; the
// three ISAs differ only in that step.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockQ4_1, BlockQ8, BlockQ8_0};
    use std::arch::x86_64::*;

    /// The 32 nibbles of a Q4_1 block as bytes: low nibbles (weights 0..16), then high ones.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        let tmp = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let both =
            _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn h(x: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.to_bits() as i32)))
    }

    /// `u8 x i8` byte products summed in groups of 4 into 8 i32 lanes, AVX2 style
    /// (`vpmaddubsw` then `vpmaddwd`; no i16 overflow: |15 * 127 * 2| and |128 * 127 * 2|
    /// fit).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot_u8i8_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// The same with AVX-VNNI's `vpdpbusd`.
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn dot_u8i8_avxvnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
    }

    /// The same with AVX-512-VNNI's `vpdpbusd` on 256-bit registers.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot_u8i8_avx512vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    macro_rules! kernels {
        ($q41:ident, $q80:ident, $q41x2:ident, $q80x2:ident, $feat:literal, $dot:ident) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q41(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut summs = 0f32;
                for (w, x) in w.iter().zip(x) {
                    let u = nibbles(&w.qs);
                    let s = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps($dot(u, s));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(h(w.d) * x.d), p, acc);
                    summs += h(w.m) * x.s;
                }
                hsum(acc) + summs
            }

            /// Two rows against the same activations (adjacent rows: the prefetch runs
            /// ahead of the second): one conversion of the four f16
            /// scales, one activation load, two independent accumulators.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q41x2(
                w0: &[BlockQ4_1],
                w1: &[BlockQ4_1],
                x: &[BlockQ8],
            ) -> [f32; 2] {
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut summs = _mm_setzero_ps();
                for ((a, b), x) in w0.iter().zip(w1).zip(x) {
                    prefetch_ahead(b);
                    let y = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                    // [d0, m0, d1, m1] * [dx, sx, dx, sx]
                    let dm = _mm_insert_epi32::<1>(
                        _mm_cvtsi32_si128(std::ptr::read_unaligned(
                            a as *const BlockQ4_1 as *const i32,
                        )),
                        std::ptr::read_unaligned(b as *const BlockQ4_1 as *const i32),
                    );
                    let xs = _mm_castpd_ps(_mm_load1_pd(x as *const BlockQ8 as *const f64));
                    let prod = _mm_mul_ps(_mm_cvtph_ps(dm), xs);
                    summs = _mm_add_ps(summs, prod);
                    let p0 = _mm256_cvtepi32_ps($dot(nibbles(&a.qs), y));
                    let p1 = _mm256_cvtepi32_ps($dot(nibbles(&b.qs), y));
                    acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(prod), p0, acc0);
                    acc1 =
                        _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehl_ps(prod, prod)), p1, acc1);
                }
                let mut sm = [0f32; 4];
                _mm_storeu_ps(sm.as_mut_ptr(), summs);
                [hsum(acc0) + sm[1], hsum(acc1) + sm[3]]
            }

            /// Two rows against the same activations.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q80x2(
                w0: &[BlockQ8_0],
                w1: &[BlockQ8_0],
                x: &[BlockQ8],
            ) -> [f32; 2] {
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                for ((a, b), x) in w0.iter().zip(w1).zip(x) {
                    prefetch_ahead(b);
                    let y = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                    let d = _mm_insert_epi16::<1>(
                        _mm_cvtsi32_si128(a.d.to_bits() as i32),
                        b.d.to_bits() as i32,
                    );
                    let prod = _mm_mul_ps(_mm_cvtph_ps(d), _mm_set1_ps(x.d));
                    let qa = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let qb = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                    let p0 =
                        _mm256_cvtepi32_ps($dot(_mm256_sign_epi8(qa, qa), _mm256_sign_epi8(y, qa)));
                    let p1 =
                        _mm256_cvtepi32_ps($dot(_mm256_sign_epi8(qb, qb), _mm256_sign_epi8(y, qb)));
                    acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(prod), p0, acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(prod)), p1, acc1);
                }
                [hsum(acc0), hsum(acc1)]
            }

            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q80(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (w, x) in w.iter().zip(x) {
                    let a = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
                    let b = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                    // |a| as u8 times b with a's sign: the same products as a * b.
                    let p =
                        _mm256_cvtepi32_ps($dot(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(h(w.d) * x.d), p, acc);
                }
                hsum(acc)
            }
        };
    }

    kernels!(
        q4_1_avx2,
        q8_0_avx2,
        q4_1x2_avx2,
        q8_0x2_avx2,
        "avx2,fma,f16c",
        dot_u8i8_avx2
    );
    kernels!(
        q4_1_avxvnni,
        q8_0_avxvnni,
        q4_1x2_avxvnni,
        q8_0x2_avxvnni,
        "avx2,fma,f16c,avxvnni",
        dot_u8i8_avxvnni
    );
    kernels!(
        q4_1_avx512vnni,
        q8_0_avx512vnni,
        q4_1x2_avx512vnni,
        q8_0x2_avx512vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        dot_u8i8_avx512vnni
    );

    /// How far ahead of the block in use the tile and two-row kernels prefetch: a member
    /// streams its chunk's weights in address order, and one core's hardware prefetchers
    /// alone leave the step waiting on memory (the weights of a 135M model do not stay in
    /// cache between tokens). Interleaved A/B on the SmolLM2 Q4_1 decode, 2 threads: 103-113
    /// tokens/s without, 125-149 at 4 KiB (2, 8 and 16 KiB were no better); without the
    /// tiles (the two-row kernels, as AVX2 CPUs run them) 62-74 -> 78-93. Into L2 (`T1`):
    /// on a slow spell 130-188 tokens/s against 111-167 into L1 (`T0`), even when the
    /// machine is quiet; `NTA` lost a third. See docs/results.md.
    const PREFETCH_BYTES: usize = 4096;

    /// Prefetches into L2 every cache line of the block `PREFETCH_BYTES` past `t` (a hint:
    /// an address past the matrix is never read).
    #[inline(always)]
    unsafe fn prefetch_ahead<T>(t: &T) {
        let p = (t as *const T as *const i8).wrapping_add(PREFETCH_BYTES);
        let mut off = 0;
        while off < std::mem::size_of::<T>() {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off));
            off += 64;
        }
    }

    /// [`super::quantize_row_q8_scalar`], 16 lanes at a time: the same float operations on
    /// each element (`|x|` maximum, `x * id`, the round-half-even constant added then taken
    /// off), so the same bits for finite inputs.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
        const MAGIC: f32 = 12_582_912.0;
        for (chunk, b) in x.chunks_exact(super::QK).zip(out.iter_mut()) {
            let v0 = _mm512_loadu_ps(chunk.as_ptr());
            let v1 = _mm512_loadu_ps(chunk.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (vid, magic) = (_mm512_set1_ps(id), _mm512_set1_ps(MAGIC));
            let round = |v: __m512| {
                _mm512_cvtps_epi32(_mm512_sub_ps(
                    _mm512_add_ps(_mm512_mul_ps(v, vid), magic),
                    magic,
                ))
            };
            let (q0, q1) = (round(v0), round(v1));
            _mm_storeu_si128(b.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(
                b.qs.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            b.d = d;
            b.s = d * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)) as f32;
        }
    }

    /// [`super::quantize_row_q8_scalar`] with AVX2, 8 lanes at a time (the same float
    /// operations per element as the AVX-512 version).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row_q8_avx2(x: &[f32], out: &mut [BlockQ8]) {
        const MAGIC: f32 = 12_582_912.0;
        let sign = _mm256_set1_ps(-0.0);
        // Byte order after the two saturating packs: 4-byte groups q0 q1 q2 q3 (elements
        // 0..4 of each register) then the same for elements 4..8.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (chunk, b) in x.chunks_exact(super::QK).zip(out.iter_mut()) {
            let p = chunk.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = |v: __m256| _mm256_andnot_ps(sign, v);
            let m = _mm256_max_ps(
                _mm256_max_ps(abs(v[0]), abs(v[1])),
                _mm256_max_ps(abs(v[2]), abs(v[3])),
            );
            let m = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (vid, magic) = (_mm256_set1_ps(id), _mm256_set1_ps(MAGIC));
            let q = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_sub_ps(
                    _mm256_add_ps(_mm256_mul_ps(v, vid), magic),
                    magic,
                ))
            });
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            _mm256_storeu_si256(
                b.qs.as_mut_ptr() as *mut __m256i,
                _mm256_permutevar8x32_epi32(bytes, order),
            );
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(
                _mm256_extracti128_si256::<1>(sum),
                _mm256_castsi256_si128(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
            b.d = d;
            b.s = d * _mm_cvtsi128_si32(sum) as f32;
        }
    }

    /// `R` input rows (`xs`) against one Q4_1 tile row-group (`tiles` = the tile's `bpr`
    /// column blocks): 16 outputs per row. Each weight tile is loaded and unpacked once for
    /// all the rows; every row's float additions run in the same order whatever `R` is, so
    /// `out[r]` does not depend on the other rows (the decode engine uses `R = 1`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn tile_q4_1_rows<const R: usize>(
        tiles: &[super::TileQ4_1],
        xs: [&[BlockQ8]; R],
        out: &mut [[f32; 16]; R],
    ) {
        let mut res = [_mm512_setzero_ps(); R];
        let low = _mm512_set1_epi8(0x0f);
        for (b, t) in tiles.iter().enumerate() {
            prefetch_ahead(t);
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for g in 0..4 {
                let p = _mm512_loadu_si512(t.qs.as_ptr().add(64 * g) as *const _);
                lo[g] = _mm512_and_si512(p, low);
                hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(p), low);
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(t.m.as_ptr() as *const __m256i));
            for r in 0..R {
                let xb = xs[r].get_unchecked(b);
                let xq = xb.qs.as_ptr() as *const i32;
                let mut a0 = _mm512_setzero_si512();
                let mut a1 = _mm512_setzero_si512();
                for g in 0..4 {
                    a0 = _mm512_dpbusd_epi32(
                        a0,
                        lo[g],
                        _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(g))),
                    );
                    a1 = _mm512_dpbusd_epi32(
                        a1,
                        hi[g],
                        _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(g + 4))),
                    );
                }
                let acc = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
                res[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(xb.d)), acc, res[r]);
                res[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xb.s), res[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), res[r]);
        }
    }

    /// [`tile_q4_1_rows`] for a Q8_0 tile row-group.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn tile_q8_0_rows<const R: usize>(
        tiles: &[super::TileQ8_0],
        xs: [&[BlockQ8]; R],
        out: &mut [[f32; 16]; R],
    ) {
        let mut res = [_mm512_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            prefetch_ahead(t);
            let mut w = [_mm512_setzero_si512(); 8];
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm512_loadu_si512(t.qs.as_ptr().add(64 * g) as *const _);
            }
            let ws = _mm512_slli_epi32::<7>(_mm512_loadu_si512(t.wsum.as_ptr() as *const _));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
            for r in 0..R {
                let xb = xs[r].get_unchecked(b);
                let xq = xb.qs.as_ptr() as *const i32;
                let mut a0 = _mm512_setzero_si512();
                let mut a1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    let x0 = std::ptr::read_unaligned(xq.add(g)) ^ 0x8080_8080u32 as i32;
                    let x1 = std::ptr::read_unaligned(xq.add(g + 1)) ^ 0x8080_8080u32 as i32;
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x0), w[g]);
                    a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(x1), w[g + 1]);
                }
                let acc = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), ws);
                res[r] = _mm512_fmadd_ps(
                    _mm512_mul_ps(d, _mm512_set1_ps(xb.d)),
                    _mm512_cvtepi32_ps(acc),
                    res[r],
                );
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), res[r]);
        }
    }

    /// `u8 x i8` dot products of 32 bytes into 8 i32 lanes, through each ISA's instruction
    /// (for the tests: every ISA must give the same integers).
    pub(super) fn lanes(isa: super::QIsa, u: &[u8; 32], s: &[i8; 32]) -> [i32; 8] {
        let (u, s) = (u.as_ptr() as *const __m256i, s.as_ptr() as *const __m256i);
        // SAFETY: callers pass only ISAs the CPU has (see `available_isas`).
        unsafe {
            match isa {
                super::QIsa::Avx2 => std::mem::transmute::<__m256i, [i32; 8]>(dot_u8i8_avx2(
                    _mm256_loadu_si256(u),
                    _mm256_loadu_si256(s),
                )),
                super::QIsa::AvxVnni => std::mem::transmute::<__m256i, [i32; 8]>(dot_u8i8_avxvnni(
                    _mm256_loadu_si256(u),
                    _mm256_loadu_si256(s),
                )),
                super::QIsa::Avx512Vnni => std::mem::transmute::<__m256i, [i32; 8]>(
                    dot_u8i8_avx512vnni(_mm256_loadu_si256(u), _mm256_loadu_si256(s)),
                ),
                super::QIsa::Scalar => unreachable!(),
            }
        }
    }
}

/// Every ISA of [`QIsa`] this CPU can run (always includes `Scalar`), for tests and benches.
pub fn available_isas() -> Vec<QIsa> {
    let best = detect_isa();
    let mut v = vec![QIsa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if best != QIsa::Scalar {
            v.push(QIsa::Avx2);
        }
        if is_x86_feature_detected!("avxvnni") && best != QIsa::Scalar {
            v.push(QIsa::AvxVnni);
        }
        if best == QIsa::Avx512Vnni {
            v.push(QIsa::Avx512Vnni);
        }
    }
    v
}

/// The 8 lane sums (`lane i = sum_{j<4} u[4i+j] * s[4i+j]`) computed with `isa`'s
/// instruction; `isa` must be in [`available_isas`].
pub fn lane_dots(isa: QIsa, u: &[u8; 32], s: &[i8; 32]) -> [i32; 8] {
    #[cfg(target_arch = "x86_64")]
    if isa != QIsa::Scalar {
        assert!(available_isas().contains(&isa), "{isa:?} is not available");
        return x86::lanes(isa, u, s);
    }
    let _ = isa;
    let mut r = [0i32; 8];
    for (i, l) in r.iter_mut().enumerate() {
        for j in 0..4 {
            *l += u[4 * i + j] as i32 * s[4 * i + j] as i32;
        }
    }
    r
}

/// One output of `Q4_1 x Q8` with `isa` (which must be in [`available_isas`]).
pub fn dot_q4_1(isa: QIsa, w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q4_1: block counts differ");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was detected on this CPU (qisa / available_isas).
    unsafe {
        match isa {
            QIsa::Avx512Vnni => return x86::q4_1_avx512vnni(w, x),
            QIsa::AvxVnni => return x86::q4_1_avxvnni(w, x),
            QIsa::Avx2 => return x86::q4_1_avx2(w, x),
            QIsa::Scalar => {}
        }
    }
    dot_q4_1_scalar(w, x)
}

/// One output of `Q8_0 x Q8` with `isa` (which must be in [`available_isas`]).
pub fn dot_q8_0(isa: QIsa, w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q8_0: block counts differ");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        match isa {
            QIsa::Avx512Vnni => return x86::q8_0_avx512vnni(w, x),
            QIsa::AvxVnni => return x86::q8_0_avxvnni(w, x),
            QIsa::Avx2 => return x86::q8_0_avx2(w, x),
            QIsa::Scalar => {}
        }
    }
    dot_q8_0_scalar(w, x)
}

/// Two outputs of `Q4_1 x Q8` (rows `w0`, `w1`, the same activations) with `isa`.
pub fn dot2_q4_1(isa: QIsa, w0: &[BlockQ4_1], w1: &[BlockQ4_1], x: &[BlockQ8]) -> [f32; 2] {
    assert!(
        w0.len() == x.len() && w1.len() == x.len(),
        "dot2_q4_1: block counts differ"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        match isa {
            QIsa::Avx512Vnni => return x86::q4_1x2_avx512vnni(w0, w1, x),
            QIsa::AvxVnni => return x86::q4_1x2_avxvnni(w0, w1, x),
            QIsa::Avx2 => return x86::q4_1x2_avx2(w0, w1, x),
            QIsa::Scalar => {}
        }
    }
    [dot_q4_1_scalar(w0, x), dot_q4_1_scalar(w1, x)]
}

/// Two outputs of `Q8_0 x Q8` with `isa`.
pub fn dot2_q8_0(isa: QIsa, w0: &[BlockQ8_0], w1: &[BlockQ8_0], x: &[BlockQ8]) -> [f32; 2] {
    assert!(
        w0.len() == x.len() && w1.len() == x.len(),
        "dot2_q8_0: block counts differ"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        match isa {
            QIsa::Avx512Vnni => return x86::q8_0x2_avx512vnni(w0, w1, x),
            QIsa::AvxVnni => return x86::q8_0x2_avxvnni(w0, w1, x),
            QIsa::Avx2 => return x86::q8_0x2_avx2(w0, w1, x),
            QIsa::Scalar => {}
        }
    }
    [dot_q8_0_scalar(w0, x), dot_q8_0_scalar(w1, x)]
}

// ---------------------------------------------------------------------------------------
// The matrix.

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]]))
}

impl QMatrix {
    /// Reads `rows * cols` weights in GGML's block layout (as `QTensor::data` returns them).
    pub fn from_ggml_bytes(
        format: QFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!(
                "{format:?} matrix [{rows}, {cols}]: the row length is not a multiple of {QK}"
            ));
        }
        let n_blocks = rows * cols / QK;
        let bb = format.block_bytes();
        if bytes.len() != n_blocks * bb {
            return Err(format!(
                "{format:?} matrix [{rows}, {cols}]: {} bytes, expected {}",
                bytes.len(),
                n_blocks * bb
            ));
        }
        let blocks = match format {
            QFormat::Q4_1 => Blocks::Q4_1(
                bytes
                    .chunks_exact(bb)
                    .map(|c| BlockQ4_1 {
                        d: f16_at(c, 0),
                        m: f16_at(c, 2),
                        qs: c[4..20].try_into().expect("16 bytes"),
                    })
                    .collect(),
            ),
            QFormat::Q8_0 => Blocks::Q8_0(
                bytes
                    .chunks_exact(bb)
                    .map(|c| {
                        let mut qs = [0i8; QK];
                        for (q, &b) in qs.iter_mut().zip(&c[2..34]) {
                            *q = b as i8;
                        }
                        BlockQ8_0 {
                            d: f16_at(c, 0),
                            qs,
                        }
                    })
                    .collect(),
            ),
        };
        let tiles = pack_tiles(&blocks, rows, cols);
        Ok(Self {
            rows,
            cols,
            blocks,
            tiles,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn format(&self) -> QFormat {
        match self.blocks {
            Blocks::Q4_1(_) => QFormat::Q4_1,
            Blocks::Q8_0(_) => QFormat::Q8_0,
        }
    }

    /// The blocks of a Q4_1 matrix (`None` for other formats).
    pub fn q4_1_blocks(&self) -> Option<&[BlockQ4_1]> {
        match &self.blocks {
            Blocks::Q4_1(v) => Some(v),
            _ => None,
        }
    }

    /// The blocks of a Q8_0 matrix (`None` for other formats).
    pub fn q8_0_blocks(&self) -> Option<&[BlockQ8_0]> {
        match &self.blocks {
            Blocks::Q8_0(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the repacked AVX-512-VNNI layout was built (this CPU has it and the row count
    /// is a multiple of 16).
    pub fn has_tiles(&self) -> bool {
        self.tiles.is_some()
    }

    /// Bytes the blocks take.
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols / QK * self.format().block_bytes()
    }

    /// The matrix with its rows reordered: row `i` of the result is row `perm[i]` of this one.
    pub fn permute_rows(&self, perm: &[usize]) -> Self {
        assert_eq!(perm.len(), self.rows, "permute_rows: permutation length");
        let bpr = self.cols / QK;
        fn gather<T: Copy>(v: &[T], perm: &[usize], bpr: usize) -> Vec<T> {
            perm.iter()
                .flat_map(|&r| v[r * bpr..(r + 1) * bpr].iter().copied())
                .collect()
        }
        let blocks = match &self.blocks {
            Blocks::Q4_1(v) => Blocks::Q4_1(gather(v, perm, bpr)),
            Blocks::Q8_0(v) => Blocks::Q8_0(gather(v, perm, bpr)),
        };
        Self {
            rows: self.rows,
            cols: self.cols,
            tiles: pack_tiles(&blocks, self.rows, self.cols),
            blocks,
        }
    }

    /// The weights as f32, row-major (what GGML's dequantization gives).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        match &self.blocks {
            Blocks::Q4_1(v) => {
                for b in v {
                    let (d, m) = (b.d.to_f32(), b.m.to_f32());
                    let mut vals = [0f32; QK];
                    for j in 0..QK / 2 {
                        vals[j] = d * (b.qs[j] & 0x0f) as f32 + m;
                        vals[j + QK / 2] = d * (b.qs[j] >> 4) as f32 + m;
                    }
                    out.extend_from_slice(&vals);
                }
            }
            Blocks::Q8_0(v) => {
                for b in v {
                    let d = b.d.to_f32();
                    out.extend(b.qs.iter().map(|&q| d * q as f32));
                }
            }
        }
        out
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / QK;
        match &self.blocks {
            Blocks::Q4_1(v) => {
                for (b, o) in v[r * bpr..(r + 1) * bpr]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let (d, m) = (b.d.to_f32(), b.m.to_f32());
                    for j in 0..QK / 2 {
                        o[j] = d * (b.qs[j] & 0x0f) as f32 + m;
                        o[j + QK / 2] = d * (b.qs[j] >> 4) as f32 + m;
                    }
                }
            }
            Blocks::Q8_0(v) => {
                for (b, o) in v[r * bpr..(r + 1) * bpr]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = b.d.to_f32();
                    for (o, &q) in o.iter_mut().zip(&b.qs) {
                        *o = d * q as f32;
                    }
                }
            }
        }
    }

    /// `out[i, r] = x[i, :] . W[r, :]` for the `m = x.len() / cols` rows of `x`, with the
    /// CPU's best kernels, output rows split over the worker pool.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_with(qisa(), x, out)
    }

    /// [`QMatrix::matmul`] with a given instruction set (one of [`available_isas`]).
    pub fn matmul_with(&self, isa: QIsa, x: &[f32], out: &mut [f32]) {
        let k = self.cols;
        assert_eq!(
            x.len() % k,
            0,
            "QMatrix::matmul: input length vs {k} columns"
        );
        let m = x.len() / k;
        assert_eq!(out.len(), m * self.rows, "QMatrix::matmul: output length");
        let bpr = k / QK;
        let mut xq = vec![
            BlockQ8 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            m * bpr
        ];
        for (xr, qr) in x.chunks_exact(k).zip(xq.chunks_exact_mut(bpr)) {
            quantize_row_q8_with(isa, xr, qr);
        }
        let rows = self.rows;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let xq = &xq;
        #[cfg(target_arch = "x86_64")]
        if let (QIsa::Avx512Vnni, Some(tiles)) = (isa, &self.tiles) {
            // Repacked layout: work items are tiles of 16 rows; each tile is read once per 4
            // input rows.
            let work = |range: std::ops::Range<usize>| {
                let out_ptr = &out_ptr;
                for t in range {
                    let mut i = 0;
                    while i < m {
                        let n = (m - i).min(4);
                        // SAFETY: tiles exist only where the CPU has AVX-512-VNNI; each
                        // (input row, tile) is written by exactly one work item.
                        unsafe {
                            match n {
                                4 => tile_rows::<4>(tiles, t, bpr, xq, i, out_ptr.0, rows),
                                3 => tile_rows::<3>(tiles, t, bpr, xq, i, out_ptr.0, rows),
                                2 => tile_rows::<2>(tiles, t, bpr, xq, i, out_ptr.0, rows),
                                _ => tile_rows::<1>(tiles, t, bpr, xq, i, out_ptr.0, rows),
                            }
                        }
                        i += n;
                    }
                }
            };
            par_items(rows / TILE, rows * k * m, work);
            return;
        }
        let work = |range: std::ops::Range<usize>| {
            let out_ptr = &out_ptr;
            // Rows in pairs (one activation load for two rows), then a last odd row.
            let mut r = range.start;
            while r < range.end {
                let pair = r + 1 < range.end;
                for (i, xr) in xq.chunks_exact(bpr).enumerate() {
                    let (r0, r1) = (r * bpr..(r + 1) * bpr, (r + 1) * bpr..(r + 2) * bpr);
                    let v: [f32; 2] = match &self.blocks {
                        Blocks::Q4_1(b) if pair => dot2_q4_1(isa, &b[r0], &b[r1], xr),
                        Blocks::Q8_0(b) if pair => dot2_q8_0(isa, &b[r0], &b[r1], xr),
                        Blocks::Q4_1(b) => [dot_q4_1(isa, &b[r0], xr), 0.0],
                        Blocks::Q8_0(b) => [dot_q8_0(isa, &b[r0], xr), 0.0],
                    };
                    // SAFETY: each (i, r) is written by exactly one work item.
                    unsafe {
                        *out_ptr.0.add(i * rows + r) = v[0];
                        if pair {
                            *out_ptr.0.add(i * rows + r + 1) = v[1];
                        }
                    }
                }
                r += if pair { 2 } else { 1 };
            }
        };
        // Work items of 16 rows.
        par_items(
            rows.div_ceil(TILE),
            rows * k * m,
            |c: std::ops::Range<usize>| work(c.start * TILE..rows.min(c.end * TILE)),
        );
    }
}

impl QMatrix {
    /// Activation blocks per input row (`cols / 32`).
    pub fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// Rows `rows` of `y = x W^T` for one input row given already quantized
    /// (`xq` = [`quantize_row_q8`] of `x`, `cols / 32` blocks), written to `out`
    /// (`rows.len()` long), on the calling thread. The kernels and the order of the float
    /// additions are those of [`QMatrix::matmul`], so each output equals the one `matmul`
    /// gives for the same row wherever `rows.start` is a multiple of [`TILE`] (how callers
    /// split a product over threads); other starts pair up the rows of the AVX2 kernels
    /// differently (the integer sums stay exact; only float rounding can differ).
    pub fn matmul_rows(&self, xq: &[BlockQ8], rows: std::ops::Range<usize>, out: &mut [f32]) {
        self.matmul_rows_with(qisa(), xq, rows, out)
    }

    /// [`QMatrix::matmul_rows`] with a given instruction set (one of [`available_isas`]).
    pub fn matmul_rows_with(
        &self,
        isa: QIsa,
        xq: &[BlockQ8],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let bpr = self.cols / QK;
        assert_eq!(
            xq.len(),
            bpr,
            "QMatrix::matmul_rows: input blocks vs {} columns",
            self.cols
        );
        assert!(
            rows.end <= self.rows,
            "QMatrix::matmul_rows: rows {rows:?} of {}",
            self.rows
        );
        assert_eq!(out.len(), rows.len(), "QMatrix::matmul_rows: output length");
        if rows.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (QIsa::Avx512Vnni, Some(tiles)) = (isa, &self.tiles) {
            let mut o = [[0f32; TILE]; 1];
            for t in rows.start / TILE..rows.end.div_ceil(TILE) {
                // SAFETY: tiles exist only where the CPU has AVX-512-VNNI.
                unsafe {
                    match tiles {
                        Tiles::Q4_1(v) => {
                            x86::tile_q4_1_rows::<1>(&v[t * bpr..(t + 1) * bpr], [xq], &mut o)
                        }
                        Tiles::Q8_0(v) => {
                            x86::tile_q8_0_rows::<1>(&v[t * bpr..(t + 1) * bpr], [xq], &mut o)
                        }
                    }
                }
                let (a, b) = ((t * TILE).max(rows.start), ((t + 1) * TILE).min(rows.end));
                out[a - rows.start..b - rows.start]
                    .copy_from_slice(&o[0][a - t * TILE..b - t * TILE]);
            }
            return;
        }
        let mut r = rows.start;
        while r < rows.end {
            let pair = r + 1 < rows.end;
            let (r0, r1) = (r * bpr..(r + 1) * bpr, (r + 1) * bpr..(r + 2) * bpr);
            let v: [f32; 2] = match &self.blocks {
                Blocks::Q4_1(b) if pair => dot2_q4_1(isa, &b[r0], &b[r1], xq),
                Blocks::Q8_0(b) if pair => dot2_q8_0(isa, &b[r0], &b[r1], xq),
                Blocks::Q4_1(b) => [dot_q4_1(isa, &b[r0], xq), 0.0],
                Blocks::Q8_0(b) => [dot_q8_0(isa, &b[r0], xq), 0.0],
            };
            out[r - rows.start] = v[0];
            if pair {
                out[r + 1 - rows.start] = v[1];
            }
            r += if pair { 2 } else { 1 };
        }
    }
}

/// Tile `t` of `tiles` against input rows `i0..i0 + R` of `xq` (`bpr` blocks each), written
/// to `out[(i0 + r) * rows + 16 t ..][..16]`.
///
/// # Safety
/// The CPU has AVX-512-VNNI; `out` holds `(i0 + R) * rows` floats and no other thread
/// writes these.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const R: usize>(
    tiles: &Tiles,
    t: usize,
    bpr: usize,
    xq: &[BlockQ8],
    i0: usize,
    out: *mut f32,
    rows: usize,
) {
    let xs: [&[BlockQ8]; R] = std::array::from_fn(|r| &xq[(i0 + r) * bpr..(i0 + r + 1) * bpr]);
    let mut o = [[0f32; TILE]; R];
    match tiles {
        Tiles::Q4_1(v) => x86::tile_q4_1_rows::<R>(&v[t * bpr..(t + 1) * bpr], xs, &mut o),
        Tiles::Q8_0(v) => x86::tile_q8_0_rows::<R>(&v[t * bpr..(t + 1) * bpr], xs, &mut o),
    }
    for (r, o) in o.iter().enumerate() {
        std::ptr::copy_nonoverlapping(o.as_ptr(), out.add((i0 + r) * rows + t * TILE), TILE);
    }
}

/// Calls `work` over disjoint ranges covering `0..n` items, on the worker pool when the
/// product is large enough (`macs` multiply-adds).
fn par_items(n: usize, macs: usize, work: impl Fn(std::ops::Range<usize>) + Sync + Send) {
    // Below ~64k multiply-adds the pool's hand-off costs more than it saves.
    if macs < 1 << 16 || n <= 1 {
        work(0..n);
    } else if use_candle_pool() {
        candle_core::utils::barrier_pool().execute_chunked(n, work);
    } else {
        // One part per rayon thread; the calling thread works on the first part itself
        // instead of sleeping until the pool is done (one hand-off per product).
        let parts = rayon::current_num_threads().min(n);
        if parts <= 1 {
            work(0..n);
            return;
        }
        let per = n.div_ceil(parts);
        let work = &work;
        rayon::in_place_scope(|s| {
            for p in 1..parts {
                let r = p * per..n.min((p + 1) * per);
                if !r.is_empty() {
                    s.spawn(move |_| work(r));
                }
            }
            work(0..per.min(n));
        });
    }
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({:?}, [{}, {}])",
            self.format(),
            self.rows,
            self.cols
        )
    }
}

/// The candle op behind [`quant_linear`] (forward only).
struct QLinearOp(std::sync::Arc<QMatrix>);

impl candle_core::CustomOp1 for QLinearOp {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("quant_linear: the input must be f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("quant_linear: the input must be contiguous")
        };
        let x = &v[a..b];
        let m = x.len() / self.0.cols;
        let mut out = vec![0f32; m * self.0.rows];
        self.0.matmul(x, &mut out);
        let mut dims = l.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = self.0.rows;
        }
        Ok((candle_core::CpuStorage::F32(out), dims.into()))
    }

    /// `dx = dy W` on the dequantized weights (`W` is frozen: no gradient of its own),
    /// dequantized for this product only.
    fn bwd(
        &self,
        _x: &candle_core::Tensor,
        _y: &candle_core::Tensor,
        dy: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let (rows, cols) = (self.0.rows, self.0.cols);
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let m = dy.elem_count() / rows;
        let w = self.0.dequantize();
        let dyv: Vec<f32> = dy.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; m * cols];
        crate::blas::gemm_f32(
            (m, cols, rows),
            1.0,
            crate::blas::Mat::new(&dyv, 0, rows, false),
            crate::blas::Mat::new(&w, 0, cols, false),
            0.0,
            &mut dx,
            0,
            cols,
        )?;
        let mut dims = dy.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = cols;
        }
        Ok(Some(candle_core::Tensor::from_vec(dx, dims, dy.device())?))
    }
}

/// `x @ W^T` for an f32 CPU tensor `x` `[.., cols]` and a quantized `W` `[rows, cols]`:
/// `[.., rows]`. The forward runs the quantized kernels (activations rounded to 8-bit
/// blocks, as in inference); the backward gives `x` its gradient `dy W` on the dequantized
/// weights (LoRA on a quantized base, `--quantization_bit`). `W` itself is frozen.
pub fn quant_linear(
    x: &candle_core::Tensor,
    w: &std::sync::Arc<QMatrix>,
) -> candle_core::Result<candle_core::Tensor> {
    let dims = x.dims();
    if dims.last() != Some(&w.cols) {
        candle_core::bail!(
            "quant_linear: input {dims:?} does not match weight [{}, {}]",
            w.rows,
            w.cols
        )
    }
    if !x.device().is_cpu() {
        candle_core::bail!("quant_linear: quantized weights run on the CPU only")
    }
    let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
    x.apply_op1(QLinearOp(w.clone()))
}

/// Whether the products run on candle's spinning worker pool (`LLMTUNE_QUANT_POOL=candle`)
/// instead of rayon's (the default). The spinning pool hands work over faster on idle cores
/// but loses badly when the cores are shared with other processes.
fn use_candle_pool() -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CANDLE.get_or_init(|| std::env::var("LLMTUNE_QUANT_POOL").is_ok_and(|v| v == "candle"))
}

struct SendPtr(*mut f32);
// SAFETY: the workers write disjoint elements (see `matmul_with`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_row_q8_rounds_like_ggml() {
        let mut x = vec![0f32; 32];
        x[0] = 1.27;
        x[1] = -0.5;
        x[2] = 0.004;
        x[3] = 0.006;
        let mut b = [BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        }];
        quantize_row_q8(&x, &mut b);
        assert!((b[0].d - 0.01).abs() < 1e-7);
        assert_eq!(&b[0].qs[..4], &[127, -50, 0, 1]);
        assert!((b[0].s - 0.78).abs() < 1e-5, "{}", b[0].s);
    }
}
