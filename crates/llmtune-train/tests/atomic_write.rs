//! `atomic_write` never exposes a partial file, even when the writer is
//! killed with SIGKILL in the middle of writing.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use llmtune_train::{atomic_write, cleanup_stale_tmp, write_json_sorted};

const CHILD_ENV: &str = "LLMTUNE_ATOMIC_WRITE_CHILD";
const SIZE: usize = 4 << 20;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmtune-atomic-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// The whole file must be one of the complete versions: SIZE copies of one byte.
fn assert_complete(bytes: &[u8]) {
    assert_eq!(bytes.len(), SIZE, "partial file of {} bytes", bytes.len());
    let first = bytes[0];
    assert!(bytes.iter().all(|&b| b == first), "mixed content");
}

#[test]
fn simulated_kill_before_rename_leaves_the_old_file() {
    let dir = tmpdir("sim");
    let target = dir.join("trainer_state.json");
    atomic_write(&target, b"old").unwrap();
    // A writer that died after writing half of its temporary, before the rename.
    let tmp = dir.join("trainer_state.json.tmp-4194999-0");
    fs::write(&tmp, b"{\"half").unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"old");
    assert_eq!(cleanup_stale_tmp(&dir).unwrap(), vec![tmp.clone()]);
    assert!(!tmp.exists());
    atomic_write(&target, b"new").unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"new");
    // Nothing else is left in the directory.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    // write_json_sorted: sorted keys, indent 2, newline.
    let v = serde_json::json!({"lora_rank": 8, "finetuning_type": "lora", "lora_target": ["q_proj", "v_proj"]});
    write_json_sorted(&dir.join("finetuning_args.json"), &v).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("finetuning_args.json")).unwrap(),
        "{\n  \"finetuning_type\": \"lora\",\n  \"lora_rank\": 8,\n  \"lora_target\": [\n    \"q_proj\",\n    \"v_proj\"\n  ]\n}\n"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// The child half of `sigkill_mid_write_never_exposes_a_partial_file`:
/// rewrites the file forever until killed. Does nothing unless started by
/// that test (hence ignored: it is not a test on its own).
#[test]
#[ignore = "helper process of sigkill_mid_write_never_exposes_a_partial_file"]
fn atomic_write_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    for i in 0u64.. {
        let byte = b'a' + (i % 26) as u8;
        atomic_write(&path, &vec![byte; SIZE]).unwrap();
    }
}

#[test]
fn sigkill_mid_write_never_exposes_a_partial_file() {
    let dir = tmpdir("kill");
    let target = dir.join("big.bin");
    atomic_write(&target, &vec![b'0'; SIZE]).unwrap();
    let exe = std::env::current_exe().unwrap();
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "atomic_write_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &target)
            .spawn()
            .unwrap();
        // Kill it at varying moments (the check does not depend on timing).
        std::thread::sleep(Duration::from_millis(30 + 37 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let bytes = fs::read(&target).unwrap();
        assert_complete(&bytes);
        let leftovers = cleanup_stale_tmp(&dir).unwrap();
        assert!(leftovers.len() <= 1, "{leftovers:?}");
        eprintln!(
            "round {round}: file holds version '{}', {} torn temporary removed",
            bytes[0] as char,
            leftovers.len()
        );
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    fs::remove_dir_all(&dir).unwrap();
}
