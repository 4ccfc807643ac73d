//! Decode-engine logits vs. the tensor path on a real GGUF:
//! `cargo run --release -p llmtune-models --example engine_parity -- model.gguf [tokens]`.
//! Prints, per position, max |engine - tensor| / max |tensor| and the top-2 gap of the
//! tensor path's logits.

use candle_core::{DType, Device, Tensor};
use llmtune_models::{load_for_inference, CausalLm, DecodeEngine};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: engine_parity model.gguf [n_tokens]");
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let p = load_for_inference(path, DType::F32, &Device::Cpu).unwrap();
    let CausalLm::Llama(m) = &p.model else {
        panic!("not a Llama model")
    };
    let vocab = m.cfg.vocab_size as u32;
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut cache = m.new_cache();
    let mut e = DecodeEngine::new(m, n)
        .unwrap()
        .expect("engine supports the model");
    // The tensor path's own two ways: one full-sequence pass vs. the incremental cache.
    let full: Vec<Vec<f32>> = {
        let t = Tensor::from_vec(tokens.clone(), (1, n), &Device::Cpu).unwrap();
        m.forward(&t, None, None, None)
            .unwrap()
            .0
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let mut worst = 0f32;
    for (pos, &t) in tokens.iter().enumerate() {
        let input = Tensor::from_vec(vec![t], (1, 1), &Device::Cpu).unwrap();
        let want: Vec<f32> = m
            .forward_last(&input, None, Some(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = e.step(t).unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        let mut s = want.clone();
        s.sort_by(|a, b| b.total_cmp(a));
        let df = full[pos]
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        println!(
            "pos {pos:3} engine rel {:.3e} abs {d:.3e} | full-vs-incremental rel {:.3e} | top2 gap {:.3e}",
            d / scale,
            df / scale,
            s[0] - s[1]
        );
        worst = worst.max(d / scale);
    }
    println!("worst rel {worst:.3e}");
}
