//! HF checkpoint load/save: round trips (f32, bf16, f16, sharded), the golden fixture dirs, crash safety, errors.

use std::path::{Path, PathBuf};

use qparallel::hf::{
    self, DiskDtype, HfError, HostTensor, SaveOptions, TensorMap, checkpoint_tensors,
    load_checkpoint, load_checkpoint_filtered, save_checkpoint,
};
use qparallel::model::config::ModelConfig;

const FIXTURES: [&str; 4] = [
    "dense_tied",
    "dense_untied",
    "moe_norm_topk",
    "moe_no_norm_topk",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn bits(t: &TensorMap) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    t.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.shape.clone(),
                v.data.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

/// Raw on-disk bytes of every tensor of a single-file checkpoint, read with the safetensors crate.
fn raw_bytes(file: &Path) -> Vec<(String, safetensors::Dtype, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn fixture_dirs_load_with_expected_names_and_shapes() {
    for name in FIXTURES {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
        let t = load_checkpoint(&dir).unwrap();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        assert_eq!(t["model.embed_tokens.weight"].shape, vec![v, h]);
        assert_eq!(
            t.contains_key("lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{name}"
        );
        assert_eq!(
            t["model.layers.1.self_attn.k_proj.weight"].shape,
            vec![cfg.kv_dim(), h]
        );
        assert_eq!(
            t["model.layers.0.self_attn.q_norm.weight"].shape,
            vec![cfg.head_dim]
        );
        if let Some(m) = &cfg.moe {
            assert_eq!(
                t["model.layers.0.mlp.gate.weight"].shape,
                vec![m.num_experts, h]
            );
            let last = format!(
                "model.layers.1.mlp.experts.{}.down_proj.weight",
                m.num_experts - 1
            );
            assert_eq!(t[&last].shape, vec![h, m.moe_intermediate_size]);
        } else {
            assert_eq!(
                t["model.layers.0.mlp.up_proj.weight"].shape,
                vec![cfg.intermediate_size, h]
            );
        }
        // Element count of the checkpoint = ModelConfig::param_count.
        let numel: usize = t.values().map(HostTensor::numel).sum();
        assert_eq!(numel as u64, cfg.param_count(), "{name}");
        // Our reader agrees bit for bit with the safetensors crate's.
        for (n, dtype, data) in raw_bytes(&dir.join(hf::SINGLE_FILE)) {
            assert_eq!(dtype, safetensors::Dtype::F32);
            let ours: Vec<u8> = t[&n].data.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(ours, data, "{name}: {n}");
        }
        // Header-only listing agrees with the load.
        let meta = checkpoint_tensors(&dir).unwrap();
        assert_eq!(
            meta.keys().collect::<Vec<_>>(),
            t.keys().collect::<Vec<_>>()
        );
    }
}

#[test]
fn f32_round_trip_is_bit_identical_and_copies_side_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("moe_norm_topk");
    let a = load_checkpoint(&src).unwrap();
    let out = tmp.path().join("ckpt-f32");
    let report =
        save_checkpoint(&out, &a, &SaveOptions::new(DiskDtype::F32).source_dir(&src)).unwrap();
    assert_eq!(report.weight_files, vec![hf::SINGLE_FILE.to_string()]);
    assert_eq!(
        report.other_files,
        vec![
            "config.json".to_string(),
            "generation_config.json".to_string()
        ]
    );
    let b = load_checkpoint(&out).unwrap();
    assert_eq!(bits(&a), bits(&b));
    // Same tensor bytes on disk as the transformers-written original.
    assert_eq!(
        raw_bytes(&src.join(hf::SINGLE_FILE)),
        raw_bytes(&out.join(hf::SINGLE_FILE))
    );
    // config.json: same model, dtype key set to what was written.
    let cfg_src = ModelConfig::from_file(src.join("config.json")).unwrap();
    let cfg_out = ModelConfig::from_file(out.join("config.json")).unwrap();
    assert_eq!(cfg_src, cfg_out);
    assert_eq!(
        std::fs::read(src.join("generation_config.json")).unwrap(),
        std::fs::read(out.join("generation_config.json")).unwrap()
    );
    assert_eq!(
        hf::remove_stale_temp_dirs(tmp.path()).unwrap(),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn bf16_and_f16_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("dense_untied");
    let orig = load_checkpoint(&src).unwrap();
    for (dtype, torch) in [(DiskDtype::BF16, "bfloat16"), (DiskDtype::F16, "float16")] {
        let first = tmp.path().join(format!("{torch}-1"));
        save_checkpoint(&first, &orig, &SaveOptions::new(dtype).source_dir(&src)).unwrap();
        let a = load_checkpoint(&first).unwrap();
        // Rounded to nearest-even, as torch's .to(bfloat16/float16).
        for (n, t) in &orig {
            let want: Vec<u32> = match dtype {
                DiskDtype::BF16 => t
                    .data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32().to_bits())
                    .collect(),
                _ => t
                    .data
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32().to_bits())
                    .collect(),
            };
            assert_eq!(
                a[n].data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want,
                "{n}"
            );
        }
        // load → save → load is the identity, tensors and on-disk bytes.
        let second = tmp.path().join(format!("{torch}-2"));
        save_checkpoint(&second, &a, &SaveOptions::new(dtype)).unwrap();
        let b = load_checkpoint(&second).unwrap();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(
            raw_bytes(&first.join(hf::SINGLE_FILE)),
            raw_bytes(&second.join(hf::SINGLE_FILE))
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(first.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            cfg["dtype"], torch,
            "transformers v5 configs carry `dtype`, which is rewritten"
        );
        assert!(
            !second.join("config.json").exists(),
            "no source dir, no config"
        );
    }
}

#[test]
fn sharded_save_and_load() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("moe_no_norm_topk");
    let orig = load_checkpoint(&src).unwrap();
    let out = tmp.path().join("sharded");
    let limit = 100_000;
    let report = save_checkpoint(
        &out,
        &orig,
        &SaveOptions::new(DiskDtype::F32)
            .max_shard_bytes(limit)
            .source_dir(&src),
    )
    .unwrap();
    let n = report.weight_files.len();
    assert!(n >= 5, "{n} shards");
    for (i, f) in report.weight_files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
        assert!(
            std::fs::metadata(out.join(f)).unwrap().len() < limit + 20_000,
            "{f} too large"
        );
    }
    assert!(!out.join(hf::SINGLE_FILE).exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(hf::INDEX_FILE)).unwrap()).unwrap();
    let numel: usize = orig.values().map(HostTensor::numel).sum();
    assert_eq!(index["metadata"]["total_size"], (numel * 4) as u64);
    assert_eq!(report.total_size, (numel * 4) as u64);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), orig.len());
    let back = load_checkpoint(&out).unwrap();
    assert_eq!(bits(&orig), bits(&back));
    // A rank loading only layer 1 gets exactly those tensors.
    let part = load_checkpoint_filtered(&out, |n| n.starts_with("model.layers.1.")).unwrap();
    assert_eq!(
        part.len(),
        orig.keys()
            .filter(|n| n.starts_with("model.layers.1."))
            .count()
    );
    assert!(part.iter().all(|(k, v)| orig[k] == *v));
    let meta = checkpoint_tensors(&out).unwrap();
    let files: std::collections::BTreeSet<_> = meta.values().map(|m| m.file.clone()).collect();
    assert_eq!(files.len(), n);
    // Re-sharding the sharded checkpoint into one file gives the original bytes.
    let single = tmp.path().join("single");
    save_checkpoint(&single, &back, &SaveOptions::new(DiskDtype::F32)).unwrap();
    assert_eq!(
        raw_bytes(&src.join(hf::SINGLE_FILE)),
        raw_bytes(&single.join(hf::SINGLE_FILE))
    );
}

#[test]
fn interrupted_save_leaves_no_committed_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("dense_tied");
    let t = load_checkpoint(&src).unwrap();
    let out = tmp.path().join("step-100");
    let mut opts = SaveOptions::new(DiskDtype::F32)
        .max_shard_bytes(50_000)
        .source_dir(&src);
    opts.fail_before_commit = true;
    let err = save_checkpoint(&out, &t, &opts).unwrap_err();
    assert!(matches!(err, HfError::Interrupted { .. }), "{err}");
    assert!(
        !out.exists(),
        "a half checkpoint is visible under the final name"
    );
    assert!(matches!(
        load_checkpoint(&out),
        Err(HfError::NoCheckpoint { .. })
    ));
    // What a crash leaves: one hidden temp dir with everything but the commit.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1);
    let name = leftovers[0].to_str().unwrap().to_string();
    assert!(name.starts_with(".step-100.tmp-"), "{name}");
    let removed = hf::remove_stale_temp_dirs(tmp.path()).unwrap();
    assert_eq!(removed, vec![tmp.path().join(&name)]);
    // A retry commits normally.
    opts.fail_before_commit = false;
    save_checkpoint(&out, &t, &opts).unwrap();
    assert_eq!(bits(&load_checkpoint(&out).unwrap()), bits(&t));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn committed_checkpoint_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let t = load_checkpoint(fixture("dense_tied")).unwrap();
    let out = tmp.path().join("ckpt");
    save_checkpoint(&out, &t, &SaveOptions::new(DiskDtype::F32)).unwrap();
    let mut other = t.clone();
    other.get_mut("model.norm.weight").unwrap().data[0] = 42.0;
    let err = save_checkpoint(&out, &other, &SaveOptions::new(DiskDtype::F32)).unwrap_err();
    assert!(matches!(err, HfError::TargetExists { .. }), "{err}");
    assert_eq!(bits(&load_checkpoint(&out).unwrap()), bits(&t));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temp dir left behind"
    );
}

#[test]
fn errors_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("dense_tied");

    // Truncated file: the last tensor's data runs past the end.
    let dir = tmp.path().join("truncated");
    std::fs::create_dir(&dir).unwrap();
    let bytes = std::fs::read(src.join(hf::SINGLE_FILE)).unwrap();
    std::fs::write(dir.join(hf::SINGLE_FILE), &bytes[..bytes.len() - 10]).unwrap();
    let err = load_checkpoint(&dir).unwrap_err();
    assert!(matches!(err, HfError::BadTensor { .. }), "{err}");
    assert!(
        err.to_string().contains("truncated/model.safetensors"),
        "{err}"
    );

    // Not a safetensors file at all.
    std::fs::write(dir.join(hf::SINGLE_FILE), b"hello").unwrap();
    assert!(matches!(
        load_checkpoint(&dir),
        Err(HfError::BadFile { .. })
    ));

    // An index naming a tensor its shard does not hold.
    let sharded = tmp.path().join("sharded");
    let t = load_checkpoint(&src).unwrap();
    let report = save_checkpoint(
        &sharded,
        &t,
        &SaveOptions::new(DiskDtype::F32).max_shard_bytes(50_000),
    )
    .unwrap();
    let first = report.weight_files[0].clone();
    let index_path = sharded.join(hf::INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = first.clone().into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = load_checkpoint(&sharded).unwrap_err();
    match &err {
        HfError::MissingTensor { path, tensor } => {
            assert_eq!(tensor, "model.layers.7.mlp.up_proj.weight");
            assert!(path.ends_with(&first), "{err}");
        }
        other => panic!("{other}"),
    }
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = "../escape.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert!(matches!(
        load_checkpoint(&sharded),
        Err(HfError::BadIndex { .. })
    ));

    // An integer tensor is not loaded as a weight, but read_i64_tensor reads it.
    let golden = src.join("golden.safetensors");
    let err = hf::load_file(&golden).unwrap_err();
    assert!(
        err.to_string().contains("input_ids") || err.to_string().contains("labels"),
        "{err}"
    );
    let (shape, ids) = hf::read_i64_tensor(&golden, "input_ids").unwrap();
    assert_eq!(shape, vec![2, 16]);
    assert!(ids.iter().all(|&i| (0..256).contains(&i)));
    let logits = hf::load_file_filtered(&golden, |n| n == "logits").unwrap();
    assert_eq!(logits["logits"].shape, vec![2, 16, 256]);

    // No checkpoint at all, and bad shapes on save.
    assert!(matches!(
        load_checkpoint(tmp.path()),
        Err(HfError::NoCheckpoint { .. })
    ));
    let mut bad = TensorMap::new();
    bad.insert(
        "w".into(),
        HostTensor {
            shape: vec![2, 3],
            data: vec![0.0; 5],
        },
    );
    let err = save_checkpoint(
        tmp.path().join("bad"),
        &bad,
        &SaveOptions::new(DiskDtype::F32),
    )
    .unwrap_err();
    assert!(
        matches!(&err, HfError::BadTensor { tensor, .. } if tensor == "w"),
        "{err}"
    );
    assert!(HostTensor::new(vec![2, 3], vec![0.0; 5]).is_err());
}
