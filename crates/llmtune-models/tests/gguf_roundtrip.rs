//! GGUF loading: a fixture model written as llama.cpp writes it (q/k rows permuted, GGUF
//! tensor names, tokenizer in the metadata) loads back to the same logits and tokenizer.

mod common;

use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use llmtune_models::load_pretrained;

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    for (a, b) in map {
        if hf == a {
            return b.to_string();
        }
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (i, part) = rest.split_once('.').unwrap();
    let (module, kind) = part.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        m => panic!("unexpected module {m}"),
    };
    format!("blk.{i}.{g}.{kind}")
}

/// llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py).
fn permute(t: &Tensor, n_head: usize) -> Tensor {
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

#[test]
fn gguf_written_like_llama_cpp_loads_back() {
    let Some(fx) = fixtures() else { return };
    let dir = fx.join("llama");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n_head = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let n_kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let vocab_size = cfg["vocab_size"].as_u64().unwrap() as usize;
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut qts: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for n in names {
        let mut t = weights[n].clone();
        if n.ends_with("q_proj.weight") {
            t = permute(&t, n_head);
        } else if n.ends_with("k_proj.weight") {
            t = permute(&t, n_kv);
        }
        qts.push((gguf_name(n), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    // Tokenizer metadata from tokenizer.json (ids in order, specials as control tokens).
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for (tok, id) in tj["model"]["vocab"].as_object().unwrap() {
        by_id.insert(id.as_u64().unwrap(), tok.clone());
    }
    let mut types: HashMap<u64, i32> = HashMap::new();
    for a in tj["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap();
        by_id.insert(id, a["content"].as_str().unwrap().to_string());
        types.insert(id, 3);
    }
    let tokens: Vec<gguf_file::Value> = (0..vocab_size as u64)
        .map(|i| {
            gguf_file::Value::String(
                by_id
                    .get(&i)
                    .cloned()
                    .unwrap_or_else(|| format!("[PAD{i}]")),
            )
        })
        .collect();
    let token_types: Vec<gguf_file::Value> = (0..vocab_size as u64)
        .map(|i| {
            gguf_file::Value::I32(if by_id.contains_key(&i) {
                *types.get(&i).unwrap_or(&1)
            } else {
                5
            })
        })
        .collect();
    let merges: Vec<gguf_file::Value> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => gguf_file::Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            serde_json::Value::String(s) => gguf_file::Value::String(s.clone()),
            _ => panic!("merge"),
        })
        .collect();
    let u32v = |x: &serde_json::Value| gguf_file::Value::U32(x.as_u64().unwrap() as u32);
    let md: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32v(&cfg["num_hidden_layers"])),
        ("llama.embedding_length", u32v(&cfg["hidden_size"])),
        ("llama.feed_forward_length", u32v(&cfg["intermediate_size"])),
        (
            "llama.attention.head_count",
            u32v(&cfg["num_attention_heads"]),
        ),
        (
            "llama.attention.head_count_kv",
            u32v(&cfg["num_key_value_heads"]),
        ),
        (
            "llama.context_length",
            u32v(&cfg["max_position_embeddings"]),
        ),
        ("llama.vocab_size", gguf_file::Value::U32(vocab_size as u32)),
        (
            "llama.rope.freq_base",
            gguf_file::Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre",
            gguf_file::Value::String("qwen2".into()),
        ),
        ("tokenizer.ggml.tokens", gguf_file::Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type",
            gguf_file::Value::Array(token_types),
        ),
        ("tokenizer.ggml.merges", gguf_file::Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", u32v(&cfg["bos_token_id"])),
        ("tokenizer.ggml.eos_token_id", u32v(&cfg["eos_token_id"])),
        (
            "tokenizer.ggml.padding_token_id",
            u32v(&cfg["pad_token_id"]),
        ),
    ];
    let path = std::env::temp_dir().join(format!("llmtune-rt-{}.gguf", std::process::id()));
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let mdr: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let tr: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &mdr, &tr).unwrap();
    }
    let p = load_pretrained(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert!(p.info.from_gguf);
    let llmtune_models::CausalLm::Llama(model) = &p.model else {
        panic!(
            "a GGUF file loads as a Llama-family model, got {}",
            p.model.arch()
        );
    };
    assert!(
        model.lm_head.is_none(),
        "no output.weight means tied embeddings"
    );
    // Logits equal the fixture's.
    let c = cases(&dir);
    let ids = &c["forward.input_ids"];
    let mask = &c["forward.attention_mask"];
    let (b, t) = ids.dims2().unwrap();
    let pos: Vec<Vec<i64>> = vec![(0..t as i64).collect(); b];
    let (logits, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let d = assert_close(
        "gguf logits",
        &flat_f32(&logits),
        &flat_f32(&c["forward.logits"]),
        Some(&valid_mask(mask, vocab_size)),
        1e-4,
        1e-4,
    );
    eprintln!("GGUF round trip: logits max |diff| {d:.3e}");
    // The tokenizer rebuilt from metadata encodes every fixture case identically.
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("tokenizer/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    for case in tc["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            p.tokenizer.encode(text, true).unwrap(),
            want,
            "case {}: {text:?}",
            case["id"]
        );
        assert_eq!(
            p.tokenizer.decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
    }
    assert_eq!(
        p.tokenizer.eos_id(),
        Some(cfg["eos_token_id"].as_u64().unwrap() as u32)
    );
    std::fs::remove_file(&path).unwrap();
}
