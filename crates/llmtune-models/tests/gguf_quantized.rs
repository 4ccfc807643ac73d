//! The quantized GGUF path: a tiny random Llama written to GGUF in `Q8_0` and in `Q4_1`
//! (llama.cpp's q/k row permutation included), loaded once dequantized to f32 and once with
//! its matrices kept quantized. The two differ only by the 8-bit quantization of the
//! activations in front of each matrix, so their logits agree closely and greedy decoding
//! picks the same tokens wherever the top two logits are further apart than that error.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use llmtune_models::gguf::{load_gguf, load_gguf_base, load_gguf_quantized};
use llmtune_models::Llama;

// The seeded weights and llama.cpp's q/k permutation of the decode-engine tests' writer.
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::{permute, Rng};

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const FFN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;

fn write_model(path: &Path, dtype: GgmlDType, tied: bool) {
    let mut rng = Rng(0x5eed ^ dtype as u64);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut mat = |name: String, out: usize, inp: usize, perm: Option<usize>| {
        let mut t = rng.tensor(&[out, inp], 1.0 / (inp as f32).sqrt());
        if let Some(h) = perm {
            t = permute(&t, h);
        }
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    mat("token_embd.weight".into(), VOCAB, HIDDEN, None);
    if !tied {
        mat("output.weight".into(), VOCAB, HIDDEN, None);
    }
    for i in 0..LAYERS {
        mat(
            format!("blk.{i}.attn_q.weight"),
            HIDDEN,
            HIDDEN,
            Some(HEADS),
        );
        mat(
            format!("blk.{i}.attn_k.weight"),
            KV * HEAD_DIM,
            HIDDEN,
            Some(KV),
        );
        mat(
            format!("blk.{i}.attn_v.weight"),
            KV * HEAD_DIM,
            HIDDEN,
            None,
        );
        mat(format!("blk.{i}.attn_output.weight"), HIDDEN, HIDDEN, None);
        mat(format!("blk.{i}.ffn_gate.weight"), FFN, HIDDEN, None);
        mat(format!("blk.{i}.ffn_up.weight"), FFN, HIDDEN, None);
        mat(format!("blk.{i}.ffn_down.weight"), HIDDEN, FFN, None);
    }
    let norm = |rng: &mut Rng| {
        let t = (rng.tensor(&[HIDDEN], 0.1) + 1.0).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    for i in 0..LAYERS {
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
        ("llama.block_count", u32v(LAYERS)),
        ("llama.embedding_length", u32v(HIDDEN)),
        ("llama.feed_forward_length", u32v(FFN)),
        ("llama.attention.head_count", u32v(HEADS)),
        ("llama.attention.head_count_kv", u32v(KV)),
        ("llama.context_length", u32v(256)),
        ("llama.vocab_size", u32v(VOCAB)),
        ("llama.rope.freq_base", gguf_file::Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
    ];
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check(dtype: GgmlDType, tied: bool, tol: f32) {
    let dir = std::env::temp_dir().join(format!("llmtune-qgguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{dtype:?}-{tied}.gguf"));
    write_model(&path, dtype, tied);
    let dev = Device::Cpu;

    let g = load_gguf(&path, &dev).unwrap();
    assert!(g.quant.is_empty());
    let f32_model = Llama::load(&g.config, &g.weights, DType::F32, &dev).unwrap();
    assert!(!f32_model.is_quantized());
    let q = load_gguf_quantized(&path).unwrap();
    assert_eq!(q.quant.len(), 7 * LAYERS + 1, "{:?}", q.quant.keys());
    let mut q_model = Llama::load(&q.config, &q.weights, DType::F32, &dev).unwrap();
    assert_eq!(q_model.attach_quantized(&q.quant).unwrap(), 7 * LAYERS + 1);
    assert!(q_model.is_quantized());
    // The placeholders hold one float, not the matrix.
    let w = &q_model.layers[0].mlp.down_proj.weight;
    assert_eq!(w.dims(), [HIDDEN, FFN]);
    assert_eq!(w.stride(), [0, 0]);
    // Every quantized matrix dequantizes to exactly the f32 path's weight (q/k rows
    // unpermuted the same way).
    let mut fm = f32_model.clone();
    let f32_linears: std::collections::HashMap<String, Tensor> = fm
        .linears_mut()
        .into_iter()
        .map(|(n, l)| (n, l.weight.clone()))
        .collect();
    let mut checked = 0;
    for (name, lin) in q_model.clone().linears_mut() {
        let qm = lin.quant.as_ref().expect("every linear is quantized");
        let want: Vec<f32> = f32_linears[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(qm.dequantize(), want, "{name}");
        checked += 1;
    }
    if tied {
        let want: Vec<f32> = f32_model
            .embed_tokens
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(q_model.tied_head_quant.as_ref().unwrap().dequantize(), want);
        checked += 1;
    }
    assert_eq!(checked, 7 * LAYERS + 1);

    // A full pass over 2 rows of 9 tokens (the batched kernel path).
    let ids: Vec<u32> = (0..18)
        .map(|i| (i * 37 + 5) as u32 % VOCAB as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (2, 9), &dev).unwrap();
    let (lf, _) = f32_model.forward(&ids, None, None, None).unwrap();
    let (lq, _) = q_model.forward(&ids, None, None, None).unwrap();
    let scale: f32 = lf.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let d = max_abs(&lf, &lq);
    eprintln!(
        "{dtype:?} tied={tied}: max |logits f32 - quantized| {d:.4e} (max |logit| {scale:.3})"
    );
    assert!(d < tol, "{dtype:?}: {d} >= {tol}");

    // Greedy decoding with a KV cache, one token at a time (the batch-1 path), 8 steps.
    let mut cf = f32_model.new_cache();
    let mut cq = q_model.new_cache();
    let prompt = Tensor::new(&[[3u32, 17, 42, 8]], &dev).unwrap();
    let mut lf = f32_model
        .forward_last(&prompt, None, Some(&mut cf))
        .unwrap();
    let mut lq = q_model.forward_last(&prompt, None, Some(&mut cq)).unwrap();
    let mut compared = 0;
    for step in 0..8 {
        let vf: Vec<f32> = lf.squeeze(0).unwrap().to_vec1().unwrap();
        let vq: Vec<f32> = lq.squeeze(0).unwrap().to_vec1().unwrap();
        let d = vf
            .iter()
            .zip(&vq)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < tol, "step {step}: {d} >= {tol}");
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        let (tf, tq) = (argmax(&vf), argmax(&vq));
        let mut sorted = vf.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Only where the f32 top-2 margin exceeds twice the logit error must the picks agree.
        if sorted[0] - sorted[1] > 2.0 * d {
            assert_eq!(tf, tq, "step {step}: greedy tokens differ");
            compared += 1;
        } else {
            eprintln!(
                "step {step}: margin {} within the error; picks not compared",
                sorted[0] - sorted[1]
            );
        }
        // Both continue with the f32 model's token so that the steps stay comparable.
        let next = Tensor::new(&[[tf as u32]], &dev).unwrap();
        lf = f32_model.forward_last(&next, None, Some(&mut cf)).unwrap();
        lq = q_model.forward_last(&next, None, Some(&mut cq)).unwrap();
    }
    eprintln!("{dtype:?}: greedy picks compared on {compared}/8 steps");
    assert!(compared >= 6, "only {compared} steps had a clear margin");
    std::fs::remove_file(&path).ok();
}

// Tolerance: logits here reach about 3.5; 8-bit activations (relative error about 0.5% per
// matrix, 16 matrices deep) gave a max difference of 0.074-0.078 over 2 x 9 x 96 logits.
#[test]
fn q8_0_gguf_quantized_path_matches_f32_path() {
    check(GgmlDType::Q8_0, false, 0.15);
}

#[test]
fn q4_1_gguf_quantized_path_matches_f32_path() {
    check(GgmlDType::Q4_1, true, 0.15);
}

#[test]
fn other_formats_stay_dequantized() {
    // F16 matrices have no quantized kernels here: the loader dequantizes them as before.
    let dir = std::env::temp_dir().join(format!("llmtune-qgguf-f16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-f16.gguf");
    write_model(&path, GgmlDType::F16, true);
    let q = load_gguf_quantized(&path).unwrap();
    assert!(q.quant.is_empty());
    let m = Llama::load(&q.config, &q.weights, DType::F32, &Device::Cpu).unwrap();
    assert!(!m.is_quantized());
    std::fs::remove_file(&path).ok();
}

/// `--quantization_bit` on a GGUF: `load_gguf_base` (tensor by tensor) must give the model
/// that "dequantize all, then `quantize_linear_weights`" gives, matrix for matrix, with the
/// file's own blocks kept where they are already in the asked format (4 bits on a `Q4_1`
/// file, 8 on `Q8_0`) and the embeddings, norms and LM head f32.
fn check_base(file: GgmlDType, bits: u32, tied: bool) {
    let dir = std::env::temp_dir().join(format!("llmtune-qgguf-base-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{file:?}-{bits}-{tied}.gguf"));
    write_model(&path, file, tied);
    let dev = Device::Cpu;

    let g = load_gguf(&path, &dev).unwrap();
    let mut want = Llama::load(&g.config, &g.weights, DType::F32, &dev).unwrap();
    assert_eq!(want.quantize_linear_weights(bits).unwrap(), (7 * LAYERS, 0));

    let b = load_gguf_base(&path, bits).unwrap();
    assert_eq!(b.quant.len(), 7 * LAYERS, "{:?}", b.quant.keys());
    let mut got = Llama::load(&b.config, &b.weights, DType::F32, &dev).unwrap();
    assert_eq!(got.attach_quantized(&b.quant).unwrap(), 7 * LAYERS);
    assert_eq!(got.quantized_linear_counts(), (7 * LAYERS, 0));
    assert!(
        got.tied_head_quant.is_none(),
        "the head stays f32 for training"
    );
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    assert_eq!(flat(&got.embed_tokens), flat(&want.embed_tokens));
    assert_eq!(got.layers[0].mlp.down_proj.weight.stride(), [0, 0]);

    let wanted: std::collections::HashMap<String, Vec<f32>> = want
        .linears_mut()
        .into_iter()
        .map(|(n, l)| {
            let v = match &l.quant {
                Some(q) => q.dequantize(),
                None => flat(&l.weight),
            };
            (n, v)
        })
        .collect();
    // The file's own blocks, for the formats kept as they are.
    let file_blocks: std::collections::HashMap<String, Vec<f32>> =
        if (file == GgmlDType::Q4_1 && bits == 4) || (file == GgmlDType::Q8_0 && bits == 8) {
            let q = load_gguf_quantized(&path).unwrap();
            q.quant
                .iter()
                .map(|(n, m)| (n.trim_end_matches(".weight").to_string(), m.dequantize()))
                .collect()
        } else {
            Default::default()
        };
    for (name, lin) in got.linears_mut() {
        match &lin.quant {
            Some(q) => {
                assert_eq!(q.dequantize(), wanted[&name], "{name}");
                if let Some(f) = file_blocks.get(&name) {
                    assert_eq!(&q.dequantize(), f, "{name}: the file's blocks");
                }
            }
            None => {
                assert!(name == "lm_head", "{name} left float");
                assert_eq!(flat(&lin.weight), wanted[&name], "{name}");
            }
        }
    }
    if bits == 4 && file == GgmlDType::Q4_1 {
        assert_eq!(file_blocks.len(), 7 * LAYERS + 1);
    }

    // The same logits (the placeholders are never read).
    let ids = Tensor::from_vec(
        (0..18).map(|i| (i * 37 + 5) % VOCAB as u32).collect(),
        (2, 9),
        &dev,
    )
    .unwrap();
    let (lw, _) = want.forward(&ids, None, None, None).unwrap();
    let (lg, _) = got.forward(&ids, None, None, None).unwrap();
    assert_eq!(max_abs(&lw, &lg), 0.0, "{file:?} {bits} bits");
    std::fs::remove_file(&path).ok();
}

#[test]
fn gguf_base_keeps_the_files_blocks_in_the_asked_format() {
    check_base(GgmlDType::Q4_1, 4, true);
    check_base(GgmlDType::Q8_0, 8, false);
}

#[test]
fn gguf_base_quantizes_other_formats_tensor_by_tensor() {
    check_base(GgmlDType::Q4_1, 8, true);
    check_base(GgmlDType::Q8_0, 4, false);
    check_base(GgmlDType::F16, 4, true);
}

#[test]
fn gguf_base_refuses_other_bit_widths() {
    let dir = std::env::temp_dir().join(format!("llmtune-qgguf-bits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    write_model(&path, GgmlDType::Q8_0, true);
    let Err(err) = load_gguf_base(&path, 3) else {
        panic!("3 bits accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("quantization_bit must be 4 or 8, got 3"),
        "{err}"
    );
    std::fs::remove_file(&path).ok();
}
