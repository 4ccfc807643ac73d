//! config.json parsing: defaults, transformers 5 `rope_parameters`, llama3 rope scaling.

use llmtune_models::config::LlamaConfig;

#[test]
fn defaults_and_rope_parameters() {
    let c = LlamaConfig::from_json_str(
        r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0},"eos_token_id":[5,6]}"#,
    )
    .unwrap();
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.rope_theta, 1e6);
    assert!(c.rope_scaling.is_none());
    assert!(c.qkv_bias, "qwen2 has q/k/v bias");
    assert_eq!(c.eos_token_ids, vec![5, 6]);
    assert_eq!(c.rms_norm_eps, 1e-6);
    let f = c.inv_freq();
    assert_eq!(f.len(), 8);
    assert!((f[1] as f64 / 1e6f64.powf(-2.0 / 16.0) - 1.0).abs() < 1e-6);
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    // Llama 3.1 8B: theta 500000, factor 8, low 1, high 4, original 8192, head_dim 128.
    let c = LlamaConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":100,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":1,"num_attention_heads":32,"num_key_value_heads":8,"rope_theta":500000.0,
            "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#,
    )
    .unwrap();
    let f = c.inv_freq();
    // High frequencies (short wavelengths) are unchanged; low ones divided by the factor.
    assert!((f[0] - 1.0).abs() < 1e-7);
    let raw_last = 500000f64.powf(-126.0 / 128.0);
    assert!(((f[63] as f64) / (raw_last / 8.0) - 1.0).abs() < 1e-6);
    // A smoothed band in between: strictly between raw/8 and raw.
    let j = 32;
    let raw = 500000f64.powf(-2.0 * j as f64 / 128.0);
    let wl = 2.0 * std::f64::consts::PI / raw;
    assert!(
        (8192.0 / 4.0..=8192.0).contains(&wl),
        "index {j} is in the smoothed band"
    );
    assert!((f[j] as f64) < raw && (f[j] as f64) > raw / 8.0);
}

#[test]
fn bad_configs_name_the_problem() {
    let err = LlamaConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not a multiple of num_key_value_heads 3"),
        "{err}"
    );
    let err = LlamaConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"hidden_act":"gelu"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hidden_act \"gelu\""), "{err}");
}
