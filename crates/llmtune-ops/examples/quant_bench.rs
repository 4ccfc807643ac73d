//! Times `QMatrix::matmul` (each available ISA) against candle's `QMatMul` for the
//! SmolLM2-135M shapes at batch 1 and 8: `cargo run --release -p llmtune-ops --example quant_bench`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llmtune_ops::quant::{available_isas, QFormat, QMatrix};

/// Best time of `reps` calls in microseconds (the machine may be shared).
fn time(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best * 1e6
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (fmt, gd) in [
        (QFormat::Q4_1, GgmlDType::Q4_1),
        (QFormat::Q8_0, GgmlDType::Q8_0),
    ] {
        for (n, k) in [
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
            let qt = QTensor::quantize(&w, gd)?;
            let ours = QMatrix::from_ggml_bytes(fmt, n, k, &qt.data()?).unwrap();
            let qmm = QMatMul::from_qtensor(qt)?;
            for m in [1usize, 8] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; m * n];
                let reps = if n > 10000 { 20 } else { 200 };
                let c = time(|| drop(qmm.forward(&x).unwrap()), reps);
                let mut line = format!("{fmt:?} [{n}x{k}] m={m}: candle {c:8.1}us");
                for isa in available_isas() {
                    let o = time(|| ours.matmul_with(isa, &xv, &mut out), reps);
                    line += &format!("  {isa:?} {o:8.1}us");
                }
                let want: Vec<f32> = qmm.forward(&x)?.flatten_all()?.to_vec1()?;
                ours.matmul(&xv, &mut out);
                let diff = want
                    .iter()
                    .zip(&out)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!("{line}  max|ours-candle| {diff:.2e}");
            }
        }
    }
    Ok(())
}
