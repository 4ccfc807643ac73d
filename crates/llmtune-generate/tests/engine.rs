//! One-prompt generation on a quantized Llama runs on the batch-1 decode engine; it must
//! give the tokens the general (batched tensor) path gives: greedy and sampled, with stop
//! ids and cancellation handled the same way. The model is a tiny random Llama written as a
//! Q4_1 GGUF (grouped-query attention).

#[path = "../../llmtune-models/tests/common/tiny_gguf.rs"]
mod tiny_gguf;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use llmtune_generate::{
    generate, generate_batched, generate_cancellable, FinishReason, GenerationConfig,
};
use llmtune_models::gguf::load_gguf_quantized;
use llmtune_models::{CausalLm, DecodeEngine, Llama};
use tiny_gguf::{write_model, Dims};

/// `tag` keeps the GGUF path of each test its own: the tests of this binary run in
/// parallel in one process, and a shared path let one test truncate the file the other read.
fn model(tag: &str) -> CausalLm {
    let d = Dims {
        vocab: 128,
        hidden: 64,
        ffn: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        dtype: GgmlDType::Q4_1,
        tied: true,
        seed: 3,
    };
    let path = std::env::temp_dir().join(format!(
        "llmtune-gen-engine-{tag}-{}.gguf",
        std::process::id()
    ));
    write_model(&path, &d);
    let q = load_gguf_quantized(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let mut m = Llama::load(&q.config, &q.weights, DType::F32, &Device::Cpu).unwrap();
    m.attach_quantized(&q.quant).unwrap();
    assert!(DecodeEngine::supports(&m));
    m.into()
}

#[test]
fn greedy_one_prompt_equals_batched_path() {
    let m = model("greedy");
    let prompt: Vec<u32> = vec![5, 17, 99, 3, 64, 12];
    let cfg = GenerationConfig {
        do_sample: false,
        max_new_tokens: 24,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let one = generate(&m, std::slice::from_ref(&prompt), 0, &cfg, |r, t| {
        streamed.push((r, t))
    })
    .unwrap();
    // Two identical rows take the general path; greedy rows are independent.
    let two = generate(&m, &[prompt.clone(), prompt.clone()], 0, &cfg, |_, _| {}).unwrap();
    assert_eq!(one[0], two[0]);
    assert_eq!(one[0].tokens.len(), 24);
    // What the engine does not take is answered as the general path does.
    let err = generate(&m, &[vec![]], 0, &cfg, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("prompt 0 is empty"), "{err}");
    let none = GenerationConfig {
        max_new_tokens: 0,
        ..cfg.clone()
    };
    let z = generate(&m, std::slice::from_ref(&prompt), 0, &none, |_, _| {}).unwrap();
    assert!(z[0].tokens.is_empty() && z[0].finish == FinishReason::Length);
    assert_eq!(one[0].finish, FinishReason::Length);
    assert_eq!(
        streamed,
        one[0].tokens.iter().map(|&t| (0, t)).collect::<Vec<_>>()
    );
    // A stop id ends the row on the same token.
    let stop = one[0].tokens[7];
    let first = one[0].tokens.iter().position(|&t| t == stop).unwrap();
    let cfg_stop = GenerationConfig {
        stop_ids: vec![stop],
        ..cfg.clone()
    };
    let s1 = generate(&m, std::slice::from_ref(&prompt), 0, &cfg_stop, |_, _| {}).unwrap();
    let s2 = generate(
        &m,
        &[prompt.clone(), prompt.clone()],
        0,
        &cfg_stop,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(s1[0], s2[0]);
    assert_eq!(s1[0].finish, FinishReason::Stop);
    assert_eq!(s1[0].tokens, one[0].tokens[..=first]);
}

#[test]
fn sampled_one_prompt_equals_general_path_and_cancels() {
    let m = model("sampled");
    let prompt: Vec<u32> = vec![1, 2, 3, 4];
    let cfg = GenerationConfig {
        do_sample: true,
        temperature: 0.9,
        top_k: 20,
        top_p: 0.9,
        repetition_penalty: 1.1,
        max_new_tokens: 16,
        seed: 11,
        ..Default::default()
    };
    let engine = generate(&m, std::slice::from_ref(&prompt), 0, &cfg, |_, _| {}).unwrap();
    // The general path for the same one row.
    let never = std::sync::atomic::AtomicBool::new(false);
    let general = generate_batched(
        &m,
        std::slice::from_ref(&prompt),
        0,
        &cfg,
        |_, _| {},
        &never,
    )
    .unwrap();
    assert_eq!(engine, general);
    // Cancelled before the first token: nothing generated.
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let c = generate_cancellable(
        &m,
        std::slice::from_ref(&prompt),
        0,
        &cfg,
        |_, _| {},
        &cancel,
    )
    .unwrap();
    assert_eq!(c[0].finish, FinishReason::Cancelled);
    assert!(c[0].tokens.is_empty());
    // Cancelled from the callback after 3 tokens: the row ends there.
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut n = 0;
    let c = generate_cancellable(
        &m,
        &[prompt],
        0,
        &cfg,
        |_, _| {
            n += 1;
            if n == 3 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    )
    .unwrap();
    assert_eq!(c[0].finish, FinishReason::Cancelled);
    assert_eq!(c[0].tokens, engine[0].tokens[..3]);
}
