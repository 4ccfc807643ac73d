//! Argument helpers shared by the subcommands.

use candle_core::{DType, Device};

/// HF-style boolean flags (`true/false/1/0/yes/no`); one parser for every subcommand.
pub use llmtune_train::args::parse_bool;

/// `--model_name_or_path` value, defaulting to the embedded model with a notice.
pub fn model_or_default(m: &Option<String>) -> String {
    match m {
        Some(m) => m.clone(),
        None => {
            let d = llmtune_models::hub::DEFAULT_MODEL;
            eprintln!("llmtune: --model_name_or_path not given; using the embedded default {d}");
            d.to_string()
        }
    }
}

/// The device to run on: CUDA when built with it and available, else CPU (saying why when a
/// CUDA build falls back).
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return Ok(d),
            Err(e) => {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                eprintln!("llmtune: no usable CUDA device ({first}); running on the CPU");
            }
        }
    }
    Ok(Device::Cpu)
}

/// f32 on CPU; bf16 on GPU unless asked otherwise.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bools_like_hf() {
        for t in ["true", "True", "1", "yes"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["false", "False", "0", "no"] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("maybe").unwrap_err().contains("not a boolean"));
    }
}
