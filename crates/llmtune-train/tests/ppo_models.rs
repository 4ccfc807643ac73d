//! PPO's models on one backbone, on a tiny random Llama (no fixtures needed):
//!
//! * the reference log-probabilities (policy adapter disabled) equal those of the model with
//!   the `checkpoint_dir` adapter merged and no LoRA (`resume_lora_training false`), and those
//!   of the raw base with `resume_lora_training true`;
//! * swapping the reward adapter in to score and out again leaves the policy's logits and values
//!   bit-identical, and the scores equal the reward model computed on its own;
//! * rollouts with the policy adapter folded into the weights match the unmerged policy and put
//!   the original weights back bit for bit;
//! * a `--reward_model` folder without a value head or adapter is refused with a message naming
//!   the flag and the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::value_head::{gather_last, last_token_index};
use llmtune_adapters::{apply_checkpoints, Lora, LoraConfig, ValueHead};
use llmtune_models::{config::LlamaConfig, loader, CausalLm, Llama};
use llmtune_train::ppo::{policy_forward, reward_scores, SeqBatch};
use llmtune_train::stages::ppo::{
    check_reward_model, load_models, with_merged_adapter, REWARD_ADAPTER,
};

/// Deterministic normal-ish numbers from a seed.
struct Rand(u64);

impl Rand {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn tensor(&mut self, shape: &[usize], std: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((0..12).map(|_| self.uniform()).sum::<f64>() - 6.0) as f32 * std as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

const H: usize = 16;
const V: usize = 37;

/// A tiny random Llama: hidden 16, 2 layers, 4 heads / 2 KV heads, FFN 24, vocab 37.
fn tiny(seed: u64) -> CausalLm {
    let json = r#"{"model_type": "llama", "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;
    let cfg = LlamaConfig::from_json_str(json).unwrap();
    let mut r = Rand::new(seed);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), r.tensor(&[V, H], 0.5));
    w.insert("lm_head.weight".into(), r.tensor(&[V, H], 0.5));
    let ones = || Tensor::ones(H, DType::F32, &Device::Cpu).unwrap();
    w.insert("model.norm.weight".into(), ones());
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        w.insert(format!("{p}.input_layernorm.weight"), ones());
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones());
        for (m, o, inp) in [
            ("self_attn.q_proj", 16, H),
            ("self_attn.k_proj", 8, H),
            ("self_attn.v_proj", 8, H),
            ("self_attn.o_proj", H, 16),
            ("mlp.gate_proj", 24, H),
            ("mlp.up_proj", 24, H),
            ("mlp.down_proj", H, 24),
        ] {
            w.insert(
                format!("{p}.{m}.weight"),
                r.tensor(&[o, inp], 1.0 / (inp as f64).sqrt()),
            );
        }
    }
    let src = loader::MapSource::new(w, "tiny");
    Llama::load(&cfg, &src, DType::F32, &Device::Cpu)
        .unwrap()
        .into()
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("llmtune-ppo-models-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Saves a random (non-trivial: B != 0) LoRA adapter with `cfg` in PEFT layout into `dir`.
fn save_random_adapter(dir: &Path, cfg: &LoraConfig, seed: u64) {
    let mut model = tiny(0);
    let mut r = Rand::new(seed);
    let mut weights = BTreeMap::new();
    for (name, lin) in model.linears_mut() {
        if cfg.target.matches(&name) {
            let (o, i) = (lin.out_features(), lin.in_features());
            weights.insert(
                name,
                (r.tensor(&[cfg.r, i], 0.3), r.tensor(&[o, cfg.r], 0.3)),
            );
        }
    }
    let mut lora = Lora::new();
    lora.insert_adapter(&mut model, "x", cfg.clone(), weights, false)
        .unwrap();
    lora.save_peft("x", dir, "tiny").unwrap();
}

/// A reward model folder: a random adapter (on other modules than the policy's) + a head.
fn save_reward_model(dir: &Path) {
    let cfg = LoraConfig::new(2, 4.0, 0.0, "q_proj,v_proj,o_proj,up_proj").unwrap();
    save_random_adapter(dir, &cfg, 99);
    ValueHead::new(H, DType::F32, &Device::Cpu, 5)
        .unwrap()
        .save(dir)
        .unwrap();
}

fn policy_cfg() -> LoraConfig {
    LoraConfig::new(4, 8.0, 0.0, "q_proj,v_proj").unwrap()
}

fn batch() -> SeqBatch {
    let queries = vec![vec![3u32, 17, 5, 9, 30], vec![8, 1, 36]];
    let responses = vec![vec![2u32, 11, 4], vec![7, 7, 20, 13, 1]];
    SeqBatch::new(&queries, &responses, 0, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The valid response entries of a `[b, r]` tensor.
fn valid(t: &Tensor, b: &SeqBatch) -> Vec<f32> {
    let v = flat(t);
    let mut out = Vec::new();
    for (i, &l) in b.response_lens.iter().enumerate() {
        out.extend_from_slice(&v[i * b.r_width..i * b.r_width + l]);
    }
    out
}

struct Dirs {
    sft: PathBuf,
    rm: PathBuf,
    trained_policy: PathBuf,
}

fn dirs(name: &str) -> Dirs {
    let root = scratch(name);
    let d = Dirs {
        sft: root.join("sft"),
        rm: root.join("rm"),
        trained_policy: root.join("policy"),
    };
    save_random_adapter(
        &d.sft,
        &LoraConfig::new(4, 8.0, 0.0, "q_proj,v_proj,down_proj").unwrap(),
        11,
    );
    save_reward_model(&d.rm);
    save_random_adapter(&d.trained_policy, &policy_cfg(), 12);
    d
}

#[test]
fn reference_logprobs_are_the_sft_model() {
    let d = dirs("reference");
    let b = batch();
    // The PPO models, with the policy adapter moved away from zero (as after some training).
    let mut model = tiny(1);
    let m = load_models(&mut model, &[&d.sft], false, &policy_cfg(), &d.rm, 7).unwrap();
    m.lora
        .load_weights_into(&m.policy, &d.trained_policy)
        .unwrap();
    let reference = {
        let _off = m.lora.disabled();
        policy_forward(&model, None, &b).unwrap().logprobs
    };
    assert_eq!(m.lora.active().as_deref(), Some(m.policy.as_str()));
    let policy = policy_forward(&model, None, &b).unwrap().logprobs;

    // The SFT model alone: the adapter merged, no LoRA at all.
    let mut sft = tiny(1);
    let ck = apply_checkpoints(&mut sft, &[&d.sft], false, false).unwrap();
    assert!(ck.lora.adapter_names().is_empty());
    let expected = policy_forward(&sft, None, &b).unwrap().logprobs;
    assert_eq!(
        valid(&reference, &b),
        valid(&expected, &b),
        "reference = SFT-merged model, bit for bit"
    );
    // Not vacuous: the policy adapter and the SFT adapter both change the numbers.
    let base = policy_forward(&tiny(1), None, &b).unwrap().logprobs;
    assert!(max_diff(&valid(&policy, &b), &valid(&reference, &b)) > 1e-3);
    assert!(max_diff(&valid(&base, &b), &valid(&reference, &b)) > 1e-3);

    // resume_lora_training true: the SFT adapter keeps training, the reference is the base.
    let mut model = tiny(1);
    let m = load_models(&mut model, &[&d.sft], true, &policy_cfg(), &d.rm, 7).unwrap();
    assert!(m.lora.is_trainable(&m.policy).unwrap());
    let reference = {
        let _off = m.lora.disabled();
        policy_forward(&model, None, &b).unwrap().logprobs
    };
    assert_eq!(valid(&reference, &b), valid(&base, &b), "reference = base");
    let policy = policy_forward(&model, None, &b).unwrap().logprobs;
    let d_sft = max_diff(&valid(&policy, &b), &valid(&expected, &b));
    assert!(d_sft < 1e-5, "resumed policy = SFT model ({d_sft})");
}

#[test]
fn reward_swap_leaves_the_policy_unchanged() {
    let d = dirs("swap");
    let b = batch();
    let mut model = tiny(1);
    let m = load_models(&mut model, &[&d.sft], false, &policy_cfg(), &d.rm, 7).unwrap();
    m.lora
        .load_weights_into(&m.policy, &d.trained_policy)
        .unwrap();
    let before = policy_forward(&model, Some(&m.critic), &b).unwrap();
    let scores = reward_scores(&model, &m.lora, REWARD_ADAPTER, &m.reward_head, &b).unwrap();
    assert_eq!(m.lora.active().as_deref(), Some(m.policy.as_str()));
    assert!(m.lora.is_enabled());
    let after = policy_forward(&model, Some(&m.critic), &b).unwrap();
    assert_eq!(
        flat(&before.logits),
        flat(&after.logits),
        "logits bit-identical"
    );
    assert_eq!(flat(&before.logprobs), flat(&after.logprobs));
    assert_eq!(
        flat(before.values.as_ref().unwrap()),
        flat(after.values.as_ref().unwrap())
    );
    assert!(!m.lora.is_trainable(REWARD_ADAPTER).unwrap());
    assert!(
        m.reward_head.trainable().is_empty(),
        "the reward head is frozen"
    );

    // The reward model on its own: SFT merged, the reward adapter on top, its head.
    let mut rm = tiny(1);
    apply_checkpoints(&mut rm, &[&d.sft], false, false).unwrap();
    let mut lora = Lora::new();
    lora.load_peft(&mut rm, &d.rm, "r", false).unwrap();
    let head = ValueHead::load(&d.rm, DType::F32, &Device::Cpu, false).unwrap();
    let hidden = rm
        .forward_hidden(&b.input_ids, Some(&b.attention_mask), None)
        .unwrap();
    let last = last_token_index(&b.attention_mask).unwrap();
    assert_eq!(last, b.last_index());
    let expected = flat(&gather_last(&head.forward(&hidden).unwrap(), &last).unwrap());
    let ours: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
    assert!(
        max_diff(&ours, &expected) < 1e-5,
        "{ours:?} vs {expected:?}"
    );
    // The reward adapter matters: scoring with the policy adapter would differ.
    let with_policy = flat(
        &gather_last(
            &m.reward_head
                .forward(
                    &model
                        .forward_hidden(&b.input_ids, Some(&b.attention_mask), None)
                        .unwrap(),
                )
                .unwrap(),
            &last,
        )
        .unwrap(),
    );
    assert!(max_diff(&ours, &with_policy) > 1e-4);
}

#[test]
fn merged_rollout_weights_match_and_are_restored() {
    let d = dirs("merged");
    let b = batch();
    let mut model = tiny(1);
    let m = load_models(&mut model, &[&d.sft], false, &policy_cfg(), &d.rm, 7).unwrap();
    m.lora
        .load_weights_into(&m.policy, &d.trained_policy)
        .unwrap();
    let before = policy_forward(&model, None, &b).unwrap().logits;
    let weights_before: Vec<Vec<f32>> = model
        .linears_mut()
        .into_iter()
        .map(|(_, l)| flat(&l.weight))
        .collect();
    let inside = with_merged_adapter(&mut model, &m.lora, &m.policy, |mm| {
        assert!(!m.lora.is_enabled(), "adapters are off while merged");
        policy_forward(mm, None, &b).unwrap().logits
    })
    .unwrap();
    assert!(m.lora.is_enabled());
    let d_merged = max_diff(&flat(&before), &flat(&inside));
    assert!(d_merged < 1e-4, "merged = unmerged policy ({d_merged})");
    let weights_after: Vec<Vec<f32>> = model
        .linears_mut()
        .into_iter()
        .map(|(_, l)| flat(&l.weight))
        .collect();
    assert_eq!(
        weights_before, weights_after,
        "weights restored bit for bit"
    );
    let after = policy_forward(&model, None, &b).unwrap().logits;
    assert_eq!(flat(&before), flat(&after));
}

#[test]
fn reward_model_folder_errors_name_the_flag_and_file() {
    let root = scratch("errors");
    let err = check_reward_model(&root.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--reward_model") && err.contains("no such folder"),
        "{err}"
    );
    let only_adapter = root.join("only_adapter");
    save_random_adapter(&only_adapter, &policy_cfg(), 1);
    let err = check_reward_model(&only_adapter).unwrap_err().to_string();
    assert!(
        err.contains("--reward_model") && err.contains("value_head.safetensors"),
        "{err}"
    );
    let only_head = root.join("only_head");
    ValueHead::new(H, DType::F32, &Device::Cpu, 1)
        .unwrap()
        .save(&only_head)
        .unwrap();
    let err = check_reward_model(&only_head).unwrap_err().to_string();
    assert!(
        err.contains("--reward_model") && err.contains("adapter_config.json"),
        "{err}"
    );
    // A head of the wrong width is refused when loading.
    let wrong = root.join("wrong");
    save_random_adapter(&wrong, &policy_cfg(), 2);
    ValueHead::new(H + 1, DType::F32, &Device::Cpu, 1)
        .unwrap()
        .save(&wrong)
        .unwrap();
    let mut model = tiny(1);
    let err = load_models(&mut model, &[] as &[&Path], false, &policy_cfg(), &wrong, 7)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--reward_model") && err.contains("17 hidden features"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(root);
}
