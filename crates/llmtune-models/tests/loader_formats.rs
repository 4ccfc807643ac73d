//! Every weight format gives the same tensors: sharded safetensors with an index, and
//! PyTorch pickle `.bin` (single and sharded with `pytorch_model.bin.index.json`).

mod common;

use candle_core::{DType, Device};
use llmtune_models::loader::{self, PthSource, SafetensorsSource, WeightSource};

fn same(a: &dyn WeightSource, b: &dyn WeightSource) -> usize {
    let mut na = a.names();
    let mut nb = b.names();
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "tensor names");
    for n in &na {
        let x = a.get(n, DType::F32, &Device::Cpu).unwrap().unwrap();
        let y = b.get(n, DType::F32, &Device::Cpu).unwrap().unwrap();
        assert_eq!(x.dims(), y.dims(), "{n}");
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{n}");
    }
    na.len()
}

#[test]
fn sharded_safetensors_equal_single_file() {
    let Some(fx) = common::fixtures() else { return };
    let src = fx.join("qwen2");
    let single = SafetensorsSource::open_file(&src.join("model.safetensors")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("llmtune-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut names: Vec<_> = all.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let sub: std::collections::HashMap<_, _> =
            part.iter().map(|n| (n.clone(), all[n].clone())).collect();
        candle_core::safetensors::save(&sub, dir.join(&file)).unwrap();
        for n in part.iter() {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = loader::open_dir(&dir).unwrap();
    assert_eq!(same(&single, sharded.as_ref()), names.len());
    // A missing shard is named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = loader::open_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pytorch_bin_equals_safetensors() {
    let Some(fx) = common::fixtures() else { return };
    for arch in ["chatglm1", "chatglm2"] {
        let dir = fx.join(arch);
        if !dir.join("pytorch_model.bin").exists() {
            eprintln!("skipped {arch}: no pytorch_model.bin");
            continue;
        }
        let bin = PthSource::open_file(&dir.join("pytorch_model.bin")).unwrap();
        let st = SafetensorsSource::open_file(&dir.join("model.safetensors")).unwrap();
        let n = same(&bin, &st);
        assert!(n > 0);
        eprintln!("{arch}: {n} tensors equal in .bin and .safetensors");
    }
}

#[test]
fn truncated_bin_names_the_file() {
    let Some(fx) = common::fixtures() else { return };
    let src = fx.join("chatglm1/pytorch_model.bin");
    if !src.exists() {
        return;
    }
    let p = std::env::temp_dir().join(format!("llmtune-trunc-{}.bin", std::process::id()));
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let err = PthSource::open_file(&p).err().unwrap().to_string();
    assert!(
        err.contains(p.to_str().unwrap()) && err.contains("PyTorch checkpoint"),
        "{err}"
    );
    std::fs::remove_file(&p).unwrap();
}
