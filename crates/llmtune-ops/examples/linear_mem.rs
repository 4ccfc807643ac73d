//! Peak memory of forward + backward through a stack of `linear` layers with frozen
//! weights, fast op vs candle's composite matmul (which computes and keeps a gradient for
//! every frozen weight).
//!
//! ```text
//! cargo run --release -p llmtune-ops --example linear_mem -- fast|reference [LAYERS]
//! ```
//! The stack is SmolLM2-135M's MLP shape without the activation: per layer `[1024, 576] ->
//! [1024, 1536] -> [1024, 576]`, default 30 layers, input a variable. Prints the peak RSS
//! (`VmHWM`) and the number of gradients in the store. Run each mode in its own process.

use candle_core::{Device, Result, Tensor, Var};
use llmtune_ops as ops;
use llmtune_ops::reference;

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("fast");
    let layers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let lin: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor> = match mode {
        "fast" => ops::linear,
        "reference" => reference::linear,
        other => candle_core::bail!("unknown mode {other} (fast|reference)"),
    };
    let dev = Device::Cpu;
    // deterministic pseudo-random values (uniform, std `scale`), so both modes compute the
    // same numbers: frac(sin(12.9898 i + seed) * 43758.5453) - 1/2
    let noise = |n: usize, seed: f64, scale: f64| -> Result<Tensor> {
        let v = Tensor::arange(0f32, n as f32, &dev)?
            .affine(12.9898, seed)?
            .sin()?
            .affine(43758.5453, 0.0)?;
        (&v - v.floor()?)?.affine(scale * 12f64.sqrt(), -0.5 * scale * 12f64.sqrt())
    };
    let weights: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|l| {
            let seed = l as f64;
            Ok((
                noise(1536 * 576, seed, 1.0 / 576f64.sqrt())?.reshape((1536, 576))?,
                noise(576 * 1536, seed + 0.5, 1.0 / 1536f64.sqrt())?.reshape((576, 1536))?,
            ))
        })
        .collect::<Result<_>>()?;
    let x = Var::from_tensor(&noise(4 * 256 * 576, 0.25, 1.0)?.reshape((4, 256, 576))?)?;
    let base = vm_hwm_mb();
    let t0 = std::time::Instant::now();
    let mut h = x.as_tensor().clone();
    for (up, down) in &weights {
        h = lin(&lin(&h, up, None)?, down, None)?;
    }
    let loss = h.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let dt = t0.elapsed().as_secs_f64();
    let gx = grads.get(x.as_tensor()).expect("input gradient");
    println!(
        "{mode}: {layers} layers, fwd+bwd {dt:.2} s, peak RSS {:.0} MB (weights+input {:.0} MB), |dx| {:.3e}",
        vm_hwm_mb(),
        base,
        gx.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?
    );
    Ok(())
}
