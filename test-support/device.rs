//! The device the fixture tests run on, chosen with `LLMTUNE_TEST_DEVICE`.
//!
//! * unset, empty or `cpu`: `Device::Cpu` (the default);
//! * `cuda` or `cuda:N`: `Device::new_cuda(N)`. The test binary must have been built with
//!   `--features cuda` (e.g. `cargo test --release --features cuda -p llmtune-models`);
//!   otherwise this panics with a message saying so instead of silently using the CPU.
//!
//! Included by each crate's `tests/common` (or test file) with
//! `#[path = ".../test-support/device.rs"] mod device;`, so that there is one copy.
//! Fixtures are always read on the CPU (`safetensors::load(.., &Device::Cpu)`); the model
//! and the inputs that the code under test does not move itself are put on this device.
#![allow(dead_code)]

use candle_core::Device;

/// The device named by `LLMTUNE_TEST_DEVICE` (default cpu). Panics on an unknown name, or
/// on `cuda` when candle was built without CUDA or no GPU is usable.
///
/// Created once per test binary: candle gives every `Device::new_cuda` call its own device
/// id, and tensors of two such devices cannot be mixed.
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(device_from_env).clone()
}

/// Whether the tests run on the CPU (some checks only make sense for the CPU kernels).
pub fn on_cpu() -> bool {
    test_device().is_cpu()
}

fn device_from_env() -> Device {
    let spec = std::env::var("LLMTUNE_TEST_DEVICE").unwrap_or_default();
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "" | "cpu" => Device::Cpu,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse()
                    .unwrap_or_else(|_| panic!("LLMTUNE_TEST_DEVICE={s}: bad CUDA ordinal")),
            };
            if !candle_core::utils::cuda_is_available() {
                panic!(
                    "LLMTUNE_TEST_DEVICE={s}, but this test binary was built without CUDA \
                     support: rebuild with `--features cuda`"
                );
            }
            let d = Device::new_cuda(ordinal)
                .unwrap_or_else(|e| panic!("LLMTUNE_TEST_DEVICE={s}: no usable CUDA device: {e}"));
            eprintln!("LLMTUNE_TEST_DEVICE={s}: tests run on cuda:{ordinal}");
            d
        }
        other => panic!("LLMTUNE_TEST_DEVICE={other}: expected `cpu`, `cuda` or `cuda:N`"),
    }
}

/// A short name of the device for log lines (`cpu`, `cuda:0`).
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        _ => format!("{:?}", d.location()),
    }
}
