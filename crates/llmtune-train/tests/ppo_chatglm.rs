//! PPO's policy forward on ChatGLM-6B (the fixture `chatglm1`, `LLMTUNE_FIXTURES`) with
//! responses of unequal length: the layout pads the shorter responses after their last token,
//! which ChatGLM-6B accepts in a full pass, and every row's log-probabilities equal those of
//! the row alone, unpadded.

use std::path::PathBuf;

use candle_core::{DType, Device};
use llmtune_models::loader::SafetensorsSource;
use llmtune_models::{CausalLm, ChatGlm, ChatGlmConfig};
use llmtune_train::ppo::{policy_forward, SeqBatch};

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

#[test]
fn chatglm1_rows_with_unequal_responses_score_as_alone() {
    let Some(fx) = fixtures() else { return };
    let dir = fx.join("chatglm1");
    let cfg = ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
    let src = SafetensorsSource::open_file(&dir.join("model.safetensors")).unwrap();
    let model: CausalLm = ChatGlm::load(&cfg, &src, DType::F32, &Device::Cpu)
        .unwrap()
        .into();
    let (g, sop) = (cfg.gmask_token_id, cfg.bos_token_id);
    let queries = vec![vec![5u32, 6, 7, g, sop], vec![8u32, g, sop]];
    let responses = vec![vec![20u32, 21], vec![22u32, 23, 24, 25, 26]];
    let dev = Device::Cpu;
    let batch = SeqBatch::new(&queries, &responses, cfg.pad_token_id, &dev).unwrap();
    let out = policy_forward(&model, None, &batch).unwrap();
    let lp: Vec<Vec<f32>> = out.logprobs.to_vec2().unwrap();
    for (i, (q, r)) in queries.iter().zip(&responses).enumerate() {
        let alone = SeqBatch::new(
            std::slice::from_ref(q),
            std::slice::from_ref(r),
            cfg.pad_token_id,
            &dev,
        )
        .unwrap();
        let want: Vec<Vec<f32>> = policy_forward(&model, None, &alone)
            .unwrap()
            .logprobs
            .to_vec2()
            .unwrap();
        for (j, w) in want[0].iter().enumerate() {
            let d = (lp[i][j] - w).abs();
            assert!(d <= 1e-4, "row {i} token {j}: {} vs {w}", lp[i][j]);
        }
    }
}
