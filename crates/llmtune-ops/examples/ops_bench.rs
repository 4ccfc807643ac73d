//! Micro-benchmark of every op, fast vs reference, forward and backward, at SmolLM2-135M
//! training shapes (batch 4 x seq 256, hidden 576, 9 heads / 3 kv heads, head dim 64, FFN
//! 1536, vocab 49152).
//!
//! ```text
//! cargo run --release -p llmtune-ops --example ops_bench [-- ITERS [FILTER [fast|reference]]]
//! ```
//! Prints the best forward and backward times of `ITERS` runs (default 5) after one
//! warm-up, and the reference/fast ratio of their sum. Both backward times include that of
//! the loss node `sum(y * r)` and of candle's gradient accumulation for the output, shown
//! on its own as `loss bw` (measured on a leaf of the output's shape). `FILTER` keeps the ops whose name
//! contains it; the last argument runs only one side (for profiling).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use llmtune_ops as ops;
use llmtune_ops::reference;

const B: usize = 4;
const T: usize = 256;
const HIDDEN: usize = 576;
const HEADS: usize = 9;
const HEAD_DIM: usize = 64;
const FFN: usize = 1536;
const VOCAB: usize = 49152;

/// An op under test: takes the leaves and returns the output.
type Op<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

fn randn(shape: &[usize], scale: f64) -> Result<Tensor> {
    Tensor::randn(0f32, scale as f32, shape, &Device::Cpu)
}

/// The best of the runs: the least disturbed by other processes on a shared machine.
fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

/// Times forward and backward of `f` on `leaves` (variables get gradients); returns the
/// best (forward, backward) seconds.
fn time(f: &Op, leaves: &[Tensor], r: &Tensor, iters: usize) -> Result<(f64, f64)> {
    let mut fw = Vec::new();
    let mut bw = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let y = f(leaves)?;
        let t1 = Instant::now();
        // a fixed random weight per output element, so the gradient is dense and contiguous
        let loss = if y.rank() == 0 {
            y
        } else {
            (y * r)?.sum_all()?
        };
        let t2 = Instant::now();
        let grads = loss.backward()?;
        let t3 = Instant::now();
        drop(grads);
        if i > 0 {
            fw.push((t1 - t0).as_secs_f64());
            bw.push((t3 - t2).as_secs_f64());
        }
    }
    Ok((best(fw), best(bw)))
}

struct Case<'a> {
    name: &'static str,
    leaves: Vec<Tensor>,
    fast: Op<'a>,
    reference: Op<'a>,
}

fn var(t: Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t)?.as_tensor().clone())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let filter = args.get(2).cloned().unwrap_or_default();
    let only = args.get(3).cloned().unwrap_or_default();
    let skip = |side: &str| !only.is_empty() && only != side;
    let n = B * T;

    let w_up = randn(&[FFN, HIDDEN], 0.02)?;
    let w_head = randn(&[VOCAB, HIDDEN], 0.02)?;
    let norm_w = (randn(&[HIDDEN], 0.1)? + 1.0)?;
    let angles = Tensor::arange(0f32, (T * HEAD_DIM / 2) as f32, &Device::Cpu)?
        .reshape((1, T, HEAD_DIM / 2))?
        .affine(0.001, 0.0)?
        .broadcast_as((B, T, HEAD_DIM / 2))?
        .contiguous()?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let mask = {
        let v: Vec<f32> = (0..T * T)
            .map(|k| {
                if k % T > k / T {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (1, 1, T, T), &Device::Cpu)?
    };
    let labels = {
        let v: Vec<i64> = (0..n)
            .map(|i| {
                if i % 7 == 0 {
                    -100
                } else {
                    (i * 7919 % VOCAB) as i64
                }
            })
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu)?
    };
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();

    let cases = vec![
        Case {
            name: "linear frozen [1024,576]x[1536,576]^T",
            leaves: vec![var(randn(&[B, T, HIDDEN], 1.0)?)?],
            fast: Box::new(|l| ops::linear(&l[0], &w_up, None)),
            reference: Box::new(|l| reference::linear(&l[0], &w_up, None)),
        },
        Case {
            name: "lm head frozen [1024,576]x[49152,576]^T",
            leaves: vec![var(randn(&[n, HIDDEN], 1.0)?)?],
            fast: Box::new(|l| ops::linear(&l[0], &w_head, None)),
            reference: Box::new(|l| reference::linear(&l[0], &w_head, None)),
        },
        Case {
            name: "linear lora-A (w var) [1024,576]x[8,576]^T",
            leaves: vec![
                var(randn(&[B, T, HIDDEN], 1.0)?)?,
                var(randn(&[8, HIDDEN], 0.02)?)?,
            ],
            fast: Box::new(|l| ops::linear(&l[0], &l[1], None)),
            reference: Box::new(|l| reference::linear(&l[0], &l[1], None)),
        },
        Case {
            name: "rms_norm [4,256,576] (frozen w)",
            leaves: vec![var(randn(&[B, T, HIDDEN], 1.0)?)?],
            fast: Box::new(|l| ops::rms_norm(&l[0], &norm_w, 1e-5)),
            reference: Box::new(|l| reference::rms_norm(&l[0], &norm_w, 1e-5)),
        },
        Case {
            name: "rope q [4,9,256,64] (transposed view)",
            leaves: vec![var(randn(&[B, T, HEADS, HEAD_DIM], 1.0)?)?],
            fast: Box::new(|l| ops::rope(&l[0].transpose(1, 2)?, &cos, &sin)),
            reference: Box::new(|l| reference::rope(&l[0].transpose(1, 2)?, &cos, &sin)),
        },
        Case {
            name: "rope_interleaved q [4,9,256,64]",
            leaves: vec![var(randn(&[B, T, HEADS, HEAD_DIM], 1.0)?)?],
            fast: Box::new(|l| ops::rope_interleaved(&l[0].transpose(1, 2)?, &cos, &sin)),
            reference: Box::new(|l| {
                reference::rope_interleaved(&l[0].transpose(1, 2)?, &cos, &sin)
            }),
        },
        Case {
            name: "softmax [4,9,256,256]",
            leaves: vec![var(randn(&[B, HEADS, T, T], 1.0)?)?],
            fast: Box::new(|l| ops::softmax_last_dim(&l[0])),
            reference: Box::new(|l| reference::softmax_last_dim(&l[0])),
        },
        Case {
            name: "masked_softmax causal, scaled [4,9,256,256]",
            leaves: vec![var(randn(&[B, HEADS, T, T], 1.0)?)?],
            fast: Box::new(|l| ops::masked_softmax(&l[0], Some(&mask), scale)),
            reference: Box::new(|l| reference::masked_softmax(&l[0], Some(&mask), scale)),
        },
        Case {
            name: "swiglu [4,256,1536]",
            leaves: vec![
                var(randn(&[B, T, FFN], 1.0)?)?,
                var(randn(&[B, T, FFN], 1.0)?)?,
            ],
            fast: Box::new(|l| ops::swiglu(&l[0], &l[1])),
            reference: Box::new(|l| reference::swiglu(&l[0], &l[1])),
        },
        Case {
            name: "cross_entropy_sum [1024,49152]",
            leaves: vec![var(randn(&[n, VOCAB], 2.0)?)?],
            fast: Box::new(|l| Ok(ops::cross_entropy_sum(&l[0], &labels)?.0)),
            reference: Box::new(|l| Ok(reference::cross_entropy_sum(&l[0], &labels)?.0)),
        },
    ];

    println!(
        "threads: rayon {}, best of {iters} runs\n{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        rayon::current_num_threads(),
        "op",
        "fast fw",
        "fast bw",
        "ref fw",
        "ref bw",
        "loss bw",
        "ratio"
    );
    for c in &cases {
        if !c.name.contains(&filter) {
            continue;
        }
        let probe = (c.fast)(&c.leaves)?;
        let r = randn(probe.dims(), 1.0)?.to_dtype(DType::F32)?;
        drop(probe);
        let (ff, fb) = if skip("fast") {
            (f64::NAN, f64::NAN)
        } else {
            time(&c.fast, &c.leaves, &r, iters)?
        };
        let (rf, rb) = if skip("reference") {
            (f64::NAN, f64::NAN)
        } else {
            time(&c.reference, &c.leaves, &r, iters)?
        };
        // the backward of the loss node itself (`sum(y * r)`), included in both bw columns
        let identity: Op = Box::new(|l| Ok(l[0].clone()));
        let (_, ob) = if r.rank() == 0 {
            (0.0, 0.0)
        } else {
            time(&identity, &[var(r.zeros_like()?)?], &r, iters)?
        };
        println!(
            "{:<44} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>6.2}x",
            c.name,
            ff * 1e3,
            fb * 1e3,
            rf * 1e3,
            rb * 1e3,
            ob * 1e3,
            (rf + rb) / (ff + fb)
        );
    }
    Ok(())
}
