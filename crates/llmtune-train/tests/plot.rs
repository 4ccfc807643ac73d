//! `plot_loss` writes valid, non-trivial PNGs and skips keys without values.

use std::fs;
use std::path::PathBuf;

use llmtune_train::{plot_loss, TrainerState};

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn plots_loss_and_eval_loss_and_skips_reward() {
    let dir = std::env::temp_dir().join(format!("llmtune-plot-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mut state = TrainerState::default();
    for step in 1..=60u64 {
        state.global_step = step * 10;
        state.epoch = Some(step as f64 / 6.0);
        let noise = ((step * 7919) % 13) as f64 / 13.0 - 0.5;
        state.log(&[
            (
                "loss",
                4.0 * (-(step as f64) / 25.0).exp() + 2.6 + 0.3 * noise,
            ),
            ("learning_rate", 5e-5),
        ]);
        if step % 10 == 0 {
            state.log(&[("eval_loss", 3.4 - step as f64 / 150.0)]);
        }
    }
    state.save(&dir.join("trainer_state.json")).unwrap();
    let written = plot_loss(&dir, &["loss", "eval_loss", "reward"]).unwrap();
    assert_eq!(
        written,
        vec![
            dir.join("training_loss.png"),
            dir.join("training_eval_loss.png")
        ]
    );
    assert!(!dir.join("training_reward.png").exists());
    for p in &written {
        let bytes = fs::read(p).unwrap();
        assert_eq!(png_size(&bytes), (640, 480));
        assert!(
            bytes.len() > 8_000,
            "{}: only {} bytes",
            p.display(),
            bytes.len()
        );
    }
    // Keep a copy to look at when LLMTUNE_PLOT_OUT is set.
    if let Some(out) = std::env::var_os("LLMTUNE_PLOT_OUT") {
        let out = PathBuf::from(out);
        fs::create_dir_all(&out).unwrap();
        for p in &written {
            fs::copy(p, out.join(p.file_name().unwrap())).unwrap();
        }
    }
    // Only the PNGs and the state are in the directory (no temporaries).
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 3);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_state_is_an_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("llmtune-plot-missing-{}", std::process::id()));
    let err = plot_loss(&dir, &["loss"]).unwrap_err().to_string();
    assert!(err.contains("trainer_state.json"), "{err}");
}
