//! The fused attention core (`llmtune_ops::attention`) against the same computation composed
//! from the reference ops (rope, repeated KV heads, matmul, masked softmax, head merge):
//! output and the gradients of q, k and v, for grouped and plain heads, padding masks and
//! every subset of tracked inputs. The fused path runs on the CPU in f32 only.

mod common;

use candle_core::{Result, Tensor};
use common::{compare, on_cpu, rand_t, test_device};
use llmtune_ops as ops;
use llmtune_ops::{reference, AttentionHeads};

/// Relative tolerance of the fused path against the composite one (both f32).
const TOL: f64 = 2e-5;

/// `cos`/`sin` `[b, t, d/2]` of rotary angles, positions shifted per batch row by `offset`.
fn cos_sin(b: usize, t: usize, half: usize, offset: usize) -> Result<(Tensor, Tensor)> {
    let mut ang = Vec::with_capacity(b * t * half);
    for bi in 0..b {
        for ti in 0..t {
            for i in 0..half {
                let pos = ti as f64 - (bi * offset) as f64;
                ang.push(pos * 10000f64.powf(-(i as f64) / half as f64));
            }
        }
    }
    let a = Tensor::from_vec(ang, (b, t, half), &test_device())?;
    Ok((a.cos()?, a.sin()?))
}

/// The additive mask `[b, 1, t, t]` of left-padded rows: batch row `bi` has `bi * pad` padding
/// positions; masked entries hold `neg` (Llama's is f32::MIN, finite).
fn padded_causal(b: usize, t: usize, pad: usize, neg: f64) -> Result<Tensor> {
    let mut v = Vec::with_capacity(b * t * t);
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                let keep = j <= i && j >= bi * pad;
                v.push(if keep { 0.0 } else { neg });
            }
        }
    }
    Tensor::from_vec(v, (b, 1, t, t), &test_device())
}

/// The composite computation, from the reference ops.
fn composite(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let AttentionHeads {
        n_head: h,
        n_kv: kvh,
        head_dim: d,
    } = ctx.heads;
    let rep = h / kvh;
    let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
    let repeat = |x: Tensor| -> Result<Tensor> {
        x.unsqueeze(2)?
            .broadcast_as((b, kvh, rep, t, d))?
            .reshape((b, h, t, d))
    };
    let (cos, sin) = (ctx.cos.to_dtype(q.dtype())?, ctx.sin.to_dtype(q.dtype())?);
    let q = reference::rope(&split(q, h)?, &cos, &sin)?;
    let k = repeat(reference::rope(&split(k, kvh)?, &cos, &sin)?)?;
    let v = repeat(split(v, kvh)?)?;
    let mask = ctx.mask.to_dtype(q.dtype())?;
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let p = reference::masked_softmax(&scores, Some(&mask), ctx.scale)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))
}

struct Ctx {
    heads: AttentionHeads,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    scale: f64,
}

fn fused(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    let (cos, sin) = (ctx.cos.to_dtype(q.dtype())?, ctx.sin.to_dtype(q.dtype())?);
    let mask = ctx.mask.to_dtype(q.dtype())?;
    match ops::attention(q, k, v, (&cos, &sin), &mask, ctx.heads, ctx.scale)? {
        Some(y) => Ok(y),
        None => candle_core::bail!("the fused path did not apply"),
    }
}

/// One case: `(name, b, t, heads, kv heads, head dim, padding per batch row, masked value)`.
type Case = (&'static str, usize, usize, usize, usize, usize, usize, f64);

#[test]
fn fused_attention_matches_the_composite_path() -> Result<()> {
    if !on_cpu() {
        println!("skipped: the fused attention runs on the CPU only");
        return Ok(());
    }
    let cases: [Case; 4] = [
        ("grouped, padded", 2, 5, 6, 2, 4, 2, f32::MIN as f64),
        ("plain heads", 1, 7, 3, 3, 8, 0, f32::MIN as f64),
        (
            "one kv head, -inf mask",
            2,
            6,
            4,
            1,
            6,
            0,
            f64::NEG_INFINITY,
        ),
        (
            "long, split over threads",
            2,
            64,
            4,
            2,
            16,
            7,
            f32::MIN as f64,
        ),
    ];
    for (i, (name, b, t, h, kvh, d, pad, neg)) in cases.into_iter().enumerate() {
        let seed = 10 * i as u64;
        let (cos, sin) = cos_sin(b, t, d / 2, pad)?;
        let ctx = Ctx {
            heads: AttentionHeads {
                n_head: h,
                n_kv: kvh,
                head_dim: d,
            },
            cos,
            sin,
            mask: padded_causal(b, t, pad, neg)?,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let inputs = [
            rand_t(&[b, t, h * d], seed + 1, 2.0),
            rand_t(&[b, t, kvh * d], seed + 2, 2.0),
            rand_t(&[b, t, kvh * d], seed + 3, 2.0),
        ];
        let f = |x: &[Tensor]| fused(&x[0], &x[1], &x[2], &ctx);
        let r = |x: &[Tensor]| composite(&x[0], &x[1], &x[2], &ctx);
        for tracked in [
            [true, true, true],
            [true, false, true], // layer 0 of a LoRA q,v run: k is frozen
            [false, false, true],
            [false, true, false],
        ] {
            let worst = compare(
                &format!("{name} {tracked:?}"),
                &inputs,
                &tracked,
                &f,
                &r,
                TOL,
            )?;
            assert!(worst.is_finite(), "{name}: non-finite difference");
        }
    }
    Ok(())
}

#[test]
fn fused_attention_declines_what_it_does_not_cover() -> Result<()> {
    if !on_cpu() {
        println!("skipped: the fused attention runs on the CPU only");
        return Ok(());
    }
    let (b, t, h, d) = (1, 4, 2, 4);
    let (cos, sin) = cos_sin(b, t, d / 2, 0)?;
    let mask = padded_causal(b, t, 0, f32::MIN as f64)?;
    let heads = AttentionHeads {
        n_head: h,
        n_kv: h,
        head_dim: d,
    };
    let x = rand_t(&[b, t, h * d], 1, 1.0);
    // f64 inputs take the composite path.
    assert!(ops::attention(&x, &x, &x, (&cos, &sin), &mask, heads, 0.5)?.is_none());
    // k/v longer than q (a KV cache) is not covered.
    let (x32, kv) = (
        x.to_dtype(candle_core::DType::F32)?,
        rand_t(&[b, t + 1, h * d], 2, 1.0).to_dtype(candle_core::DType::F32)?,
    );
    assert!(ops::attention(&x32, &kv, &kv, (&cos, &sin), &mask, heads, 0.5)?.is_none());
    // The covered case does apply.
    let (c32, s32, m32) = (
        cos.to_dtype(candle_core::DType::F32)?,
        sin.to_dtype(candle_core::DType::F32)?,
        mask.to_dtype(candle_core::DType::F32)?,
    );
    assert!(ops::attention(&x32, &x32, &x32, (&c32, &s32), &m32, heads, 0.5)?.is_some());
    Ok(())
}
