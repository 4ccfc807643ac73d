//! A tiny random Llama written as a quantized GGUF (llama.cpp's q/k row permutation
//! included), with the dimensions given, for tests of the quantized inference path. Shared
//! by the decode-engine tests of llmtune-models and llmtune-generate.

#![allow(dead_code)]

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The model's dimensions and formats.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: GgmlDType,
    /// LM head tied to the embeddings (else an `output.weight`).
    pub tied: bool,
    pub seed: u64,
}

/// xorshift, so the weights are the same on every run.
pub struct Rng(pub u64);
impl Rng {
    pub fn normalish(&mut self) -> f32 {
        let mut s = 0f32;
        for _ in 0..4 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            s += (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        }
        s * 0.866
    }
    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normalish() * std).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py).
pub fn permute(t: &Tensor, n_head: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let hd = dims[0] / n_head;
    let mut shape = vec![n_head, 2, hd / 2];
    shape.extend(&dims[1..]);
    t.reshape(shape)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

pub fn write_model(path: &Path, d: &Dims) {
    let mut rng = Rng(d.seed ^ d.dtype as u64);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let (qd, kvd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let dtype = d.dtype;
    let mut mat = |name: String, out: usize, inp: usize, perm: Option<usize>| {
        let mut t = rng.tensor(&[out, inp], 1.0 / (inp as f32).sqrt());
        if let Some(h) = perm {
            t = permute(&t, h);
        }
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    mat("token_embd.weight".into(), d.vocab, d.hidden, None);
    if !d.tied {
        mat("output.weight".into(), d.vocab, d.hidden, None);
    }
    for i in 0..d.layers {
        mat(
            format!("blk.{i}.attn_q.weight"),
            qd,
            d.hidden,
            Some(d.heads),
        );
        mat(
            format!("blk.{i}.attn_k.weight"),
            kvd,
            d.hidden,
            Some(d.kv_heads),
        );
        mat(format!("blk.{i}.attn_v.weight"), kvd, d.hidden, None);
        mat(format!("blk.{i}.attn_output.weight"), d.hidden, qd, None);
        mat(format!("blk.{i}.ffn_gate.weight"), d.ffn, d.hidden, None);
        mat(format!("blk.{i}.ffn_up.weight"), d.ffn, d.hidden, None);
        mat(format!("blk.{i}.ffn_down.weight"), d.hidden, d.ffn, None);
    }
    let norm = |rng: &mut Rng| {
        let t = (rng.tensor(&[d.hidden], 0.1) + 1.0).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    for i in 0..d.layers {
        tensors.push((format!("blk.{i}.attn_norm.weight"), norm(&mut rng)));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), norm(&mut rng)));
    }
    tensors.push(("output_norm.weight".into(), norm(&mut rng)));
    let u32v = |x: usize| gguf_file::Value::U32(x as u32);
    let md: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32v(d.layers)),
        ("llama.embedding_length", u32v(d.hidden)),
        ("llama.feed_forward_length", u32v(d.ffn)),
        ("llama.attention.head_count", u32v(d.heads)),
        ("llama.attention.head_count_kv", u32v(d.kv_heads)),
        ("llama.attention.key_length", u32v(d.head_dim)),
        ("llama.context_length", u32v(256)),
        ("llama.vocab_size", u32v(d.vocab)),
        ("llama.rope.freq_base", gguf_file::Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
    ];
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}
