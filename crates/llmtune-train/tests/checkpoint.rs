//! Checkpoint save/load round trip, atomicity and pruning.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use llmtune_train::checkpoint::{
    checkpoint_path, list_checkpoints, DATA_POSITION_NAME, RNG_STATE_NAME,
};
use llmtune_train::optim::is_no_decay_default;
use llmtune_train::{
    cleanup_stale_tmp, latest_checkpoint, load_checkpoint, resolve_resume_from_checkpoint,
    rotate_checkpoints, save_checkpoint, AdamW, AdamWConfig, CheckpointData, DataPosition,
    Gradients, LrScheduler, Rng, SchedulerType, TrainerState,
};

/// A pid that cannot be alive (above Linux's PID_MAX_LIMIT of 2^22).
const DEAD_PID: u32 = 4_194_999;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmtune-ckpt-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn vars() -> Vec<(String, Var)> {
    let mut rng = Rng::seed_from_u64(3);
    let mut mk = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        (name.to_string(), Var::from_tensor(&t).unwrap())
    };
    vec![
        mk("layers.0.q_proj.lora_A.weight", &[4, 8]),
        mk("layers.0.q_proj.lora_B.weight", &[8, 4]),
        mk("v_head.summary.bias", &[1]),
    ]
}

fn grads(vars: &[(String, Var)], rng: &mut Rng) -> Gradients {
    let mut g = Gradients::new();
    for (name, v) in vars {
        let data: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.next_f32() * 2.0 - 1.0)
            .collect();
        g.insert(
            name.clone(),
            Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap(),
        );
    }
    g
}

fn bits(v: &Var) -> Vec<u32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn optimizer(vars: Vec<(String, Var)>) -> AdamW {
    let config = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    AdamW::with_no_decay(vars, config, is_no_decay_default).unwrap()
}

struct Run {
    vars: Vec<(String, Var)>,
    opt: AdamW,
    sched: LrScheduler,
    data_rng: Rng,
    state: TrainerState,
}

impl Run {
    fn new() -> Run {
        let vars = vars();
        Run {
            opt: optimizer(vars.clone()),
            vars,
            sched: LrScheduler::new(SchedulerType::Cosine, 1e-3, 10, 2).unwrap(),
            data_rng: Rng::seed_from_u64(42),
            state: TrainerState {
                max_steps: 10,
                ..Default::default()
            },
        }
    }

    fn step(&mut self) {
        let g = grads(&self.vars, &mut self.data_rng);
        self.opt.set_lr(self.sched.last_lr());
        self.opt.step(&g).unwrap();
        self.sched.step();
        self.state.global_step += 1;
        self.state.log(&[
            ("loss", 1.0 / self.state.global_step as f64),
            ("learning_rate", self.sched.last_lr()),
        ]);
    }

    fn save(&self, out: &Path) -> PathBuf {
        let mut rngs = BTreeMap::new();
        rngs.insert("data".to_string(), self.data_rng.state());
        let pos = DataPosition {
            epoch: 1,
            step_in_epoch: 2,
            batch_in_epoch: 16,
            permutation_seed: 43,
        };
        let data = CheckpointData {
            optimizer: &self.opt,
            scheduler: &self.sched,
            rngs: &rngs,
            trainer_state: &self.state,
            data_position: &pos,
        };
        let adapter: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_checkpoint(out, self.state.global_step, &data, |dir: &Path| {
            let bytes = safetensors::serialize(adapter, None)?;
            fs::write(dir.join("adapter_model.safetensors"), bytes)?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .unwrap()
    }
}

#[test]
fn round_trip_resumes_bit_exactly() {
    let out = tmpdir("roundtrip");
    let mut a = Run::new();
    for _ in 0..3 {
        a.step();
    }
    let ckpt = a.save(&out);
    assert_eq!(ckpt, checkpoint_path(&out, 3));
    for f in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        RNG_STATE_NAME,
        "trainer_state.json",
        DATA_POSITION_NAME,
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }

    // "Kill" and resume in a fresh run: weights from the adapter file, the
    // rest from the checkpoint.
    let mut b = Run::new();
    let adapter =
        candle_core::safetensors::load(ckpt.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, v) in &b.vars {
        v.set(&adapter[name]).unwrap();
    }
    let loaded = load_checkpoint(&ckpt, &mut b.opt).unwrap();
    assert_eq!(loaded.trainer_state, a.state);
    assert_eq!(loaded.scheduler, a.sched);
    assert_eq!(loaded.data_position.batch_in_epoch, 16);
    assert_eq!(loaded.data_position.permutation_seed, 43);
    assert_eq!(b.opt.step_count(), 3);
    b.sched = loaded.scheduler;
    b.state = loaded.trainer_state;
    b.data_rng = Rng::from_state(&loaded.rngs["data"]).unwrap();
    for name in a.opt.named_vars().iter().map(|(n, _)| n) {
        let (ma, va) = a.opt.moments(name).unwrap();
        let (mb, vb) = b.opt.moments(name).unwrap();
        let eq = |x: &Tensor, y: &Tensor| {
            let x: Vec<u32> = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let y: Vec<u32> = y
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            x == y
        };
        assert!(eq(ma, mb) && eq(va, vb), "moments of {name} differ");
    }
    // Both continue identically.
    for _ in 0..3 {
        a.step();
        b.step();
    }
    for ((_, va), (_, vb)) in a.vars.iter().zip(&b.vars) {
        assert_eq!(bits(va), bits(vb));
    }
    assert_eq!(a.state, b.state);
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn killed_writes_never_show_and_are_cleaned_up() {
    let out = tmpdir("killed");
    let mut run = Run::new();
    run.step();
    run.save(&out);
    run.step();
    let second = run.save(&out);
    // A writer killed while writing checkpoint-3: its temporary directory
    // holds half the files.
    let torn = out.join(format!("checkpoint-3.tmp-{DEAD_PID}-0"));
    fs::create_dir_all(&torn).unwrap();
    fs::write(torn.join("optimizer.safetensors"), b"partial").unwrap();
    // And a half-written trainer_state.json next to it.
    fs::write(
        out.join(format!("trainer_state.json.tmp-{DEAD_PID}-1")),
        b"{\"glob",
    )
    .unwrap();
    assert_eq!(latest_checkpoint(&out).unwrap(), Some(second.clone()));
    assert_eq!(
        list_checkpoints(&out)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        resolve_resume_from_checkpoint(&out, "true").unwrap(),
        Some(second.clone())
    );
    let mut opt = optimizer(vars());
    load_checkpoint(&second, &mut opt).unwrap();
    let mut removed = cleanup_stale_tmp(&out).unwrap();
    removed.sort();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(!torn.exists());
    // A failing caller writer leaves nothing behind.
    let rngs = BTreeMap::new();
    let data = CheckpointData {
        optimizer: &run.opt,
        scheduler: &run.sched,
        rngs: &rngs,
        trainer_state: &run.state,
        data_position: &DataPosition::default(),
    };
    let err = save_checkpoint(&out, 9, &data, |_dir: &Path| Err::<(), _>("disk full")).unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["checkpoint-1", "checkpoint-2"]);
    // Re-saving an existing step replaces it.
    run.save(&out);
    assert_eq!(list_checkpoints(&out).unwrap().len(), 2);
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn resume_argument() {
    let out = tmpdir("resume");
    assert_eq!(resolve_resume_from_checkpoint(&out, "false").unwrap(), None);
    assert_eq!(resolve_resume_from_checkpoint(&out, "").unwrap(), None);
    let err = resolve_resume_from_checkpoint(&out, "True")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--resume_from_checkpoint: no valid checkpoint found in output directory"),
        "{err}"
    );
    let missing = out.join("checkpoint-77");
    let err = resolve_resume_from_checkpoint(&out, missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint-77"), "{err}");
    fs::create_dir_all(out.join("checkpoint-5")).unwrap();
    fs::create_dir_all(out.join("checkpoint-40")).unwrap();
    fs::create_dir_all(out.join("checkpoint-7")).unwrap();
    fs::create_dir_all(out.join("checkpoint-x")).unwrap();
    assert_eq!(
        latest_checkpoint(&out).unwrap(),
        Some(out.join("checkpoint-40"))
    );
    let p = out.join("checkpoint-7");
    assert_eq!(
        resolve_resume_from_checkpoint(&out, p.to_str().unwrap()).unwrap(),
        Some(p)
    );
    // A directory that is not a checkpoint fails to load, naming the file.
    let mut opt = optimizer(vars());
    let err = load_checkpoint(&out.join("checkpoint-7"), &mut opt)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint-7") && err.contains("trainer_state.json"),
        "{err}"
    );
    fs::remove_dir_all(&out).unwrap();
}

fn remaining_after(limit: usize, best: Option<u64>) -> Vec<u64> {
    let out = tmpdir(&format!("rotate-{limit}-{best:?}"));
    for step in [10, 20, 30, 40, 50] {
        fs::create_dir_all(checkpoint_path(&out, step)).unwrap();
    }
    let best = best.map(|s| checkpoint_path(&out, s).to_string_lossy().into_owned());
    let deleted = rotate_checkpoints(&out, Some(limit), best.as_deref()).unwrap();
    let left: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(deleted.len() + left.len(), 5);
    // No temporaries are left after deleting.
    assert_eq!(fs::read_dir(&out).unwrap().count(), left.len());
    fs::remove_dir_all(&out).unwrap();
    left
}

#[test]
fn pruning_keeps_the_newest_and_the_best() {
    // HF's _rotate_checkpoints: the oldest go first; the best is never deleted.
    assert_eq!(remaining_after(2, None), [40, 50]);
    assert_eq!(remaining_after(3, None), [30, 40, 50]);
    assert_eq!(remaining_after(2, Some(20)), [20, 50]);
    assert_eq!(remaining_after(3, Some(10)), [10, 40, 50]);
    assert_eq!(remaining_after(3, Some(40)), [30, 40, 50]);
    assert_eq!(remaining_after(1, Some(20)), [20, 50]);
    assert_eq!(remaining_after(1, Some(50)), [50]);
    assert_eq!(remaining_after(5, Some(20)), [10, 20, 30, 40, 50]);
    assert_eq!(remaining_after(0, None), [10, 20, 30, 40, 50]);
}
