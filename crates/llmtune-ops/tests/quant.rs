//! Quantized kernels: every ISA's integer block sums equal the plain-Rust ones exactly, the
//! float results agree to float rounding, and the matrix product equals an f64 product of
//! the dequantized weights with the quantized activations.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llmtune_ops::quant::{
    available_isas, block_dot_q4_1, block_dot_q8_0, dot_q4_1, dot_q4_1_scalar, dot_q8_0,
    dot_q8_0_scalar, lane_dots, quantize_row_q8, quantize_row_q8_scalar, quantize_row_q8_with,
    BlockQ8, QFormat, QIsa, QMatrix, QK,
};

/// A small deterministic generator (xorshift), so the tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn quantized(fmt: QFormat, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let mut r = Rng(seed);
    let w: Vec<f32> = (0..rows * cols).map(|_| r.f32() * 0.1 + 0.01).collect();
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let gd = match fmt {
        QFormat::Q4_1 => GgmlDType::Q4_1,
        QFormat::Q8_0 => GgmlDType::Q8_0,
    };
    let qt = QTensor::quantize(&t, gd).unwrap();
    QMatrix::from_ggml_bytes(fmt, rows, cols, &qt.data().unwrap()).unwrap()
}

fn act(x: &[f32]) -> Vec<BlockQ8> {
    let mut b = vec![
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK]
        };
        x.len() / QK
    ];
    quantize_row_q8(x, &mut b);
    b
}

#[test]
fn lane_dots_are_exact_on_every_isa() {
    let mut r = Rng(7);
    let isas = available_isas();
    eprintln!("ISAs on this CPU: {isas:?}");
    for case in 0..2000 {
        let mut u = [0u8; 32];
        let mut s = [0i8; 32];
        for j in 0..32 {
            // The kernels' domain: Q4_1 nibbles 0..=15, |Q8_0 weight| 0..=128, activations
            // -127..=127 (AVX2's 16-bit pair sums cannot saturate there).
            u[j] = if case % 2 == 0 {
                (r.next() % 16) as u8
            } else {
                (r.next() % 129) as u8
            };
            s[j] = ((r.next() % 255) as i32 - 127) as i8;
        }
        if case == 0 {
            u = [128; 32];
            s = [-127; 32];
        }
        let want = lane_dots(QIsa::Scalar, &u, &s);
        for &isa in &isas {
            assert_eq!(lane_dots(isa, &u, &s), want, "{isa:?} case {case}");
        }
    }
}

#[test]
fn q4_1_and_q8_0_dots_match_scalar_on_every_isa() {
    let isas = available_isas();
    for (fmt, seed) in [(QFormat::Q4_1, 1u64), (QFormat::Q8_0, 2)] {
        for cols in [32usize, 576, 1536] {
            let w = quantized(fmt, 3, cols, seed + cols as u64);
            let mut r = Rng(99 + cols as u64);
            let x: Vec<f32> = (0..cols).map(|_| r.f32()).collect();
            let xq = act(&x);
            let mut want = vec![0f32; 3];
            w.matmul_with(QIsa::Scalar, &x, &mut want);
            // Float rounding bound: relative to the sum of the blocks' absolute terms.
            let bpr = cols / QK;
            let scale: Vec<f32> = (0..3)
                .map(|r| match fmt {
                    QFormat::Q4_1 => w.q4_1_blocks().unwrap()[r * bpr..(r + 1) * bpr]
                        .iter()
                        .zip(&xq)
                        .map(|(b, a)| {
                            (b.d.to_f32() * a.d * block_dot_q4_1(b, a) as f32).abs()
                                + (b.m.to_f32() * a.s).abs()
                        })
                        .sum(),
                    QFormat::Q8_0 => w.q8_0_blocks().unwrap()[r * bpr..(r + 1) * bpr]
                        .iter()
                        .zip(&xq)
                        .map(|(b, a)| (b.d.to_f32() * a.d * block_dot_q8_0(b, a) as f32).abs())
                        .sum(),
                })
                .collect();
            for &isa in &isas {
                let mut got = vec![0f32; 3];
                w.matmul_with(isa, &x, &mut got);
                for ((g, e), sc) in got.iter().zip(&want).zip(&scale) {
                    let tol = 1e-6 * sc.max(1e-3);
                    assert!((g - e).abs() <= tol, "{fmt:?} {cols} {isa:?}: {g} vs {e}");
                }
            }
            // The scalar product equals an f64 sum of dequantized weights times dequantized
            // activations (the kernels are exact up to float rounding).
            let deq = w.dequantize();
            for (row, e) in deq.chunks_exact(cols).zip(&want) {
                let mut acc = 0f64;
                for (b, wb) in xq.iter().zip(row.chunks_exact(QK)) {
                    for (q, wv) in b.qs.iter().zip(wb) {
                        acc += *wv as f64 * (b.d as f64 * *q as f64);
                    }
                }
                assert!(
                    (acc - *e as f64).abs() <= 1e-5 * acc.abs().max(1.0),
                    "{fmt:?} {cols}: scalar {e} vs f64 {acc}"
                );
            }
        }
    }
}

#[test]
fn block_level_entry_points_agree() {
    let w = quantized(QFormat::Q4_1, 1, 64, 5);
    let w8 = quantized(QFormat::Q8_0, 1, 64, 6);
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let xq = act(&x);
    // Through the matrix API and through the block API.
    let mut o = [0f32];
    w.matmul_with(QIsa::Scalar, &x, &mut o);
    let blocks = w.q4_1_blocks().unwrap();
    assert_eq!(dot_q4_1_scalar(blocks, &xq), o[0]);
    w8.matmul_with(QIsa::Scalar, &x, &mut o);
    let blocks8 = w8.q8_0_blocks().unwrap();
    assert_eq!(dot_q8_0_scalar(blocks8, &xq), o[0]);
    for isa in available_isas() {
        let a = dot_q4_1(isa, blocks, &xq);
        let b = dot_q8_0(isa, blocks8, &xq);
        assert!((a - dot_q4_1_scalar(blocks, &xq)).abs() <= 1e-6 * a.abs().max(1.0));
        assert!((b - dot_q8_0_scalar(blocks8, &xq)).abs() <= 1e-6 * b.abs().max(1.0));
    }
}

#[test]
fn quantize_row_q8_equals_scalar_on_every_isa() {
    // Random rows at several scales, an all-zero block, and a block whose scale is 1 so that
    // halves fall exactly between two integers (round half to even: 2.5 -> 2, -3.5 -> -4).
    let mut r = Rng(99);
    let mut rows: Vec<Vec<f32>> = [1e-6f32, 0.01, 1.0, 300.0]
        .iter()
        .map(|&sc| (0..4 * QK).map(|_| r.f32() * sc).collect())
        .collect();
    let mut ties = vec![0f32; QK];
    ties[0] = 127.0;
    for (j, t) in ties.iter_mut().enumerate().skip(1) {
        *t = (j as f32 - 16.0) + 0.5;
    }
    rows.push([vec![0f32; QK], ties].concat());
    for (i, x) in rows.iter().enumerate() {
        let mut want = act(x);
        quantize_row_q8_scalar(x, &mut want);
        for isa in available_isas() {
            let mut got = want.clone();
            got.iter_mut().for_each(|b| {
                *b = BlockQ8 {
                    d: -1.0,
                    s: -1.0,
                    qs: [9; QK],
                }
            });
            quantize_row_q8_with(isa, x, &mut got);
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.qs, w.qs, "{isa:?} row {i} block {b}");
                assert_eq!(g.d.to_bits(), w.d.to_bits(), "{isa:?} row {i} block {b} d");
                assert_eq!(g.s.to_bits(), w.s.to_bits(), "{isa:?} row {i} block {b} s");
            }
        }
    }
    let ties = &act(&rows[4])[1];
    assert_eq!((ties.qs[0], ties.qs[3], ties.qs[18]), (127, -12, 2));
}

#[test]
fn matmul_batches_and_threads_match_per_row_products() {
    // Large enough to go through the worker pool; 5, 6 and 7 rows of input (the tiled
    // kernels take rows 4 at a time, then 1, 2 or 3); 208 rows are tiled where the CPU
    // has AVX-512-VNNI, 200 never.
    for (fmt, n, m) in [QFormat::Q4_1, QFormat::Q8_0]
        .into_iter()
        .flat_map(|f| [200usize, 208].map(|n| (f, n)))
        .flat_map(|(f, n)| [5usize, 6, 7].map(|m| (f, n, m)))
    {
        let k = 576usize;
        let w = quantized(fmt, n, k, 11);
        let mut r = Rng(12);
        let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
        let mut out = vec![0f32; m * n];
        w.matmul(&x, &mut out);
        for i in 0..m {
            let mut one = vec![0f32; n];
            w.matmul(&x[i * k..(i + 1) * k], &mut one);
            assert_eq!(
                &out[i * n..(i + 1) * n],
                &one[..],
                "{fmt:?} {n}x{k} m={m} row {i}"
            );
        }
        // Against candle's dequantized f32 product: only activation quantization differs
        // (|x| <= 1, 8-bit blocks: relative error about 1/254 per element, random signs).
        let deq = Tensor::from_vec(w.dequantize(), (n, k), &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let want: Vec<f32> = xt
            .matmul(&deq.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = want
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 2e-2, "{fmt:?}: max |quantized - f32| {max}");
    }
}

#[test]
fn bad_sizes_are_clear_errors() {
    let e = QMatrix::from_ggml_bytes(QFormat::Q4_1, 2, 48, &[0; 60]).unwrap_err();
    assert!(e.contains("not a multiple of 32"), "{e}");
    let e = QMatrix::from_ggml_bytes(QFormat::Q8_0, 2, 64, &[0; 100]).unwrap_err();
    assert!(e.contains("100 bytes, expected 136"), "{e}");
}

#[test]
fn permute_rows_and_dequantize_row() {
    let w = quantized(QFormat::Q4_1, 4, 64, 3);
    let p = w.permute_rows(&[2, 0, 3, 1]);
    let (a, b) = (w.dequantize(), p.dequantize());
    assert_eq!(&b[0..64], &a[128..192]);
    assert_eq!(&b[64..128], &a[0..64]);
    let mut row = vec![0f32; 64];
    p.dequantize_row(2, &mut row);
    assert_eq!(&row[..], &a[192..256]);
}

#[test]
fn tiled_layout_matches_scalar() {
    // 48 rows: three 16-row tiles (repacked on CPUs with AVX-512-VNNI).
    let isas = available_isas();
    for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
        for cols in [32usize, 576] {
            let (n, m) = (48usize, 3usize);
            let w = quantized(fmt, n, cols, 21 + cols as u64);
            assert_eq!(w.has_tiles(), isas.contains(&QIsa::Avx512Vnni));
            let mut r = Rng(31);
            let x: Vec<f32> = (0..m * cols).map(|_| r.f32()).collect();
            let mut want = vec![0f32; m * n];
            w.matmul_with(QIsa::Scalar, &x, &mut want);
            // Float rounding bound from the f64 sum of |w| |x_q|.
            let deq = w.dequantize();
            for &isa in &isas {
                let mut got = vec![0f32; m * n];
                w.matmul_with(isa, &x, &mut got);
                for i in 0..m {
                    let xq = act(&x[i * cols..(i + 1) * cols]);
                    for (rr, row) in deq.chunks_exact(cols).enumerate() {
                        let mut abs = 0f64;
                        for (b, wb) in xq.iter().zip(row.chunks_exact(QK)) {
                            for (q, wv) in b.qs.iter().zip(wb) {
                                abs += (*wv as f64 * b.d as f64 * *q as f64).abs();
                            }
                        }
                        let (g, e) = (got[i * n + rr], want[i * n + rr]);
                        assert!(
                            ((g - e).abs() as f64) <= 1e-6 * abs.max(1e-3) + 1e-7,
                            "{fmt:?} {cols} {isa:?} row {rr} input {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_rows_equals_matmul_on_every_isa_and_split() {
    // 80 rows (5 tiles) and 40 rows (not a multiple of 16: never tiled); ranges that start on
    // a tile boundary give bit-identical outputs, other starts agree to float rounding.
    for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
        for n in [80usize, 40] {
            let k = 128usize;
            let w = quantized(fmt, n, k, 41 + n as u64);
            let mut r = Rng(42);
            let x: Vec<f32> = (0..k).map(|_| r.f32()).collect();
            let xq = act(&x);
            assert_eq!(w.blocks_per_row(), xq.len());
            for &isa in &available_isas() {
                let mut want = vec![0f32; n];
                w.matmul_with(isa, &x, &mut want);
                let mut got = vec![f32::NAN; n];
                for (a, b) in [(0, 16), (16, 32), (32, n)] {
                    w.matmul_rows_with(isa, &xq, a..b, &mut got[a..b]);
                }
                assert_eq!(got, want, "{fmt:?} {n} {isa:?} aligned");
                let mut odd = vec![f32::NAN; n];
                for (a, b) in [(0, 7), (7, 23), (23, n)] {
                    w.matmul_rows_with(isa, &xq, a..b, &mut odd[a..b]);
                }
                for (i, (g, e)) in odd.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                        "{fmt:?} {isa:?} {i}"
                    );
                }
            }
            let mut empty: [f32; 0] = [];
            w.matmul_rows(&xq, 3..3, &mut empty);
        }
    }
}

#[test]
fn quant_linear_backward_is_dy_times_the_dequantized_weight() {
    // LoRA on a quantized base: the input gradient of a frozen quantized layer.
    for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
        let (n, k) = (48usize, 64usize);
        let w = std::sync::Arc::new(quantized(fmt, n, k, 5));
        let mut r = Rng(6);
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..2 * 3 * k).map(|_| r.f32()).collect();
        let x =
            candle_core::Var::from_tensor(&Tensor::from_vec(xs, (2, 3, k), &dev).unwrap()).unwrap();
        let dys: Vec<f32> = (0..2 * 3 * n).map(|_| r.f32()).collect();
        let dy = Tensor::from_vec(dys, (2, 3, n), &dev).unwrap();
        let y = llmtune_ops::quant::quant_linear(x.as_tensor(), &w).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let got: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let deq = Tensor::from_vec(w.dequantize(), (n, k), &dev).unwrap();
        let want: Vec<f32> = dy
            .reshape((6, n))
            .unwrap()
            .matmul(&deq)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                "{fmt:?} {i}: {g} vs {e}"
            );
        }
    }
}

#[test]
fn swiglu_in_quant_equals_the_composed_quantized_mlp_input() {
    // The fused MLP input on a quantized base: the forward is bit for bit the composed
    // `swiglu(quant_linear(x, wg), quant_linear(x, wu))`, the input gradient the same sums.
    let dev = Device::Cpu;
    for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
        let (inter, k) = (48usize, 64usize);
        let wg = std::sync::Arc::new(quantized(fmt, inter, k, 7));
        let wu = std::sync::Arc::new(quantized(fmt, inter, k, 8));
        let mut r = Rng(9);
        let xs: Vec<f32> = (0..2 * 5 * k).map(|_| r.f32()).collect();
        let x =
            candle_core::Var::from_tensor(&Tensor::from_vec(xs, (2, 5, k), &dev).unwrap()).unwrap();
        let dys: Vec<f32> = (0..2 * 5 * inter).map(|_| r.f32()).collect();
        let dy = Tensor::from_vec(dys, (2, 5, inter), &dev).unwrap();
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let run = |fused: bool| {
            let y = if fused {
                llmtune_ops::swiglu_in_quant(x.as_tensor(), &wg, &wu)
                    .unwrap()
                    .expect("applies")
            } else {
                let g = llmtune_ops::quant::quant_linear(x.as_tensor(), &wg).unwrap();
                let u = llmtune_ops::quant::quant_linear(x.as_tensor(), &wu).unwrap();
                llmtune_ops::swiglu(&g, &u).unwrap()
            };
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(grads.get(&x).unwrap()))
        };
        let (y_fused, dx_fused) = run(true);
        let (y_comp, dx_comp) = run(false);
        assert_eq!(y_fused, y_comp, "{fmt:?} forward");
        for (i, (g, e)) in dx_fused.iter().zip(&dx_comp).enumerate() {
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                "{fmt:?} dx {i}: {g} vs {e}"
            );
        }
        // Untracked (inference): the same forward, nothing kept.
        let y = llmtune_ops::swiglu_in_quant(&x.as_tensor().detach(), &wg, &wu)
            .unwrap()
            .unwrap();
        assert_eq!(flat(&y), y_fused);
        // Shapes that do not fit are left to the caller.
        let other = std::sync::Arc::new(quantized(fmt, inter + 16, k, 10));
        assert!(llmtune_ops::swiglu_in_quant(x.as_tensor(), &wg, &other)
            .unwrap()
            .is_none());
    }
}
