//! Unit tests of the LoRA building blocks: config validation, target resolution, key names, the effective-weight
//! identity and the adapter gradients against explicit sums, adapter file round trips and refusals.

use qkernels::{Device, Tensor, ops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::hf::{HostTensor, TensorMap};
use crate::model::ModelConfig;

fn tiny(moe: bool) -> ModelConfig {
    let mut j = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    if moe {
        j["model_type"] = "qwen3_moe".into();
        j["num_experts"] = 4.into();
        j["num_experts_per_tok"] = 2.into();
        j["moe_intermediate_size"] = 16.into();
        j["mlp_only_layers"] = serde_json::json!([1]);
    }
    ModelConfig::from_json_value(&j, "tiny").unwrap()
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

#[test]
fn config_validation_names_the_key() {
    let ok = LoraConfig::new(8, 16.0);
    ok.validate_for_training().unwrap();
    assert_eq!(ok.scaling(), 2.0);
    let cases = [
        (
            LoraConfig {
                rank: 0,
                ..ok.clone()
            },
            "lora.rank",
        ),
        (
            LoraConfig {
                alpha: 0.0,
                ..ok.clone()
            },
            "lora.alpha",
        ),
        (
            LoraConfig {
                alpha: f64::NAN,
                ..ok.clone()
            },
            "lora.alpha",
        ),
        (
            LoraConfig {
                dropout: 1.0,
                ..ok.clone()
            },
            "lora.dropout",
        ),
        (
            LoraConfig {
                dropout: -0.1,
                ..ok.clone()
            },
            "lora.dropout",
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Names(vec![]),
                ..ok.clone()
            },
            "lora.target_modules",
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Names(vec!["q_proj".into(), "all-linear".into()]),
                ..ok.clone()
            },
            "lora.target_modules",
        ),
    ];
    for (c, key) in cases {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{c:?}: {e}");
    }
    // Dropout is fine to describe adapters, refused for training (with the reason).
    let d = LoraConfig {
        dropout: 0.05,
        ..ok
    };
    d.validate().unwrap();
    let e = d.validate_for_training().unwrap_err().to_string();
    assert!(e.contains("lora.dropout") && e.contains("effective"), "{e}");
    assert_eq!(
        "all-linear".parse::<TargetModules>().unwrap(),
        TargetModules::AllLinear
    );
    assert_eq!(
        " q_proj, v_proj ".parse::<TargetModules>().unwrap(),
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
}

#[test]
fn all_linear_and_named_targets() {
    let dense = tiny(false);
    let all = target_weights(&dense, &TargetModules::AllLinear).unwrap();
    assert_eq!(all.len(), 14);
    assert!(
        all.iter()
            .all(|(n, s)| n.starts_with("model.layers.") && s.len() == 2)
    );
    assert!(all.contains(&(
        "model.layers.1.mlp.down_proj.weight".to_string(),
        vec![32, 48]
    )));
    // PEFT suffix matching: short names, partial paths and full names.
    let named = target_weights(
        &dense,
        &TargetModules::Names(vec![
            "self_attn.q_proj".into(),
            "model.layers.0.mlp.up_proj".into(),
        ]),
    )
    .unwrap();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight"
        ]
    );
    // `proj` is not a dot-separated suffix of `q_proj`.
    for (bad, want) in [
        ("proj", "matches no module"),
        ("embed_tokens", "cannot carry"),
        ("q_norm", "cannot carry"),
    ] {
        let e = target_weights(&dense, &TargetModules::Names(vec![bad.into()]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.target_modules") && e.contains(want),
            "{bad}: {e}"
        );
    }
    // MoE: all-linear covers attention, the dense layer and every expert, not the router.
    let moe = tiny(true);
    let all = target_weights(&moe, &TargetModules::AllLinear).unwrap();
    assert_eq!(all.len(), 2 * 4 + 3 + 4 * 3);
    assert!(
        all.iter()
            .any(|(n, _)| n == "model.layers.0.mlp.experts.3.down_proj.weight")
    );
    assert!(!all.iter().any(|(n, _)| n.ends_with("mlp.gate.weight")));
    let router = target_weights(&moe, &TargetModules::Names(vec!["gate".into()])).unwrap();
    assert_eq!(
        router,
        vec![("model.layers.0.mlp.gate.weight".to_string(), vec![4, 32])]
    );
}

#[test]
fn peft_keys_round_trip() {
    let w = "model.layers.3.mlp.experts.2.up_proj.weight";
    let a = peft_key(w, "lora_A");
    assert_eq!(
        a,
        "base_model.model.model.layers.3.mlp.experts.2.up_proj.lora_A.weight"
    );
    assert_eq!(parse_peft_key(&a), Some((w.to_string(), true)));
    assert_eq!(
        parse_peft_key(&peft_key(w, "lora_B")),
        Some((w.to_string(), false))
    );
    assert_eq!(parse_peft_key("model.layers.0.q_proj.lora_A.weight"), None);
    assert_eq!(
        parse_peft_key("base_model.model.x.lora_magnitude_vector"),
        None
    );
}

#[test]
fn init_follows_peft_defaults() {
    let cfg = tiny(false);
    let lc = LoraConfig::new(4, 8.0);
    let ad = LoraAdapters::init(&cfg, &lc, 7).unwrap();
    assert_eq!((ad.rank, ad.scaling, ad.pairs.len()), (4, 2.0, 14));
    for (name, p) in &ad.pairs {
        let inp = p.a.shape[1];
        let bound = 1.0 / (inp as f32).sqrt();
        assert_eq!(p.a.shape[0], 4, "{name}");
        assert!(p.a.data.iter().all(|x| x.abs() <= bound), "{name}");
        // Spread over the whole range, not a constant.
        let max = p.a.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max > 0.8 * bound, "{name}: max |A| {max} vs bound {bound}");
        assert!(
            p.b.data.iter().all(|&x| x == 0.0) && p.b.shape[1] == 4,
            "{name}"
        );
    }
    assert_eq!(ad, LoraAdapters::init(&cfg, &lc, 7).unwrap(), "seeded");
    assert_ne!(ad, LoraAdapters::init(&cfg, &lc, 8).unwrap());
}

/// `x·(W + s·B·A)ᵀ = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, and the adapter gradients equal explicit sums of `G`.
#[test]
fn effective_weight_and_adapter_gradients_match_the_adapter_path() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(3);
    let (n, out, inp, r, s) = (5, 7, 6, 3, 1.5f32);
    let t = |rng: &mut StdRng, shape: &[usize]| {
        Tensor::from_f32(rand_vec(rng, shape.iter().product()), shape, &dev).unwrap()
    };
    let (x, w, a, b) = (
        t(&mut rng, &[n, inp]),
        t(&mut rng, &[out, inp]),
        t(&mut rng, &[r, inp]),
        t(&mut rng, &[out, r]),
    );
    let merged = ops::linear_fwd(&x, &effective_weight(&w, &a, &b, s).unwrap())
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let path = ops::linear_fwd(&x, &w)
        .unwrap()
        .add(
            &ops::linear_fwd(&ops::linear_fwd(&x, &a).unwrap(), &b)
                .unwrap()
                .scale(s)
                .unwrap(),
        )
        .unwrap()
        .to_vec_f32()
        .unwrap();
    for (p, q) in merged.iter().zip(&path) {
        assert!((p - q).abs() < 1e-5, "{p} vs {q}");
    }

    let g = t(&mut rng, &[out, inp]);
    let (da, db) = adapter_grads(&g, &a, &b, s).unwrap();
    let (gv, av, bv) = (
        g.to_vec_f32().unwrap(),
        a.to_vec_f32().unwrap(),
        b.to_vec_f32().unwrap(),
    );
    let (dav, dbv) = (da.to_vec_f32().unwrap(), db.to_vec_f32().unwrap());
    assert_eq!((da.shape(), db.shape()), (&[r, inp][..], &[out, r][..]));
    // dA[k,i] = s Σ_o B[o,k] G[o,i];  dB[o,k] = s Σ_i G[o,i] A[k,i]
    for k in 0..r {
        for i in 0..inp {
            let want: f32 = s
                * (0..out)
                    .map(|o| bv[o * r + k] * gv[o * inp + i])
                    .sum::<f32>();
            assert!((dav[k * inp + i] - want).abs() < 1e-5);
        }
    }
    for o in 0..out {
        for k in 0..r {
            let want: f32 = s
                * (0..inp)
                    .map(|i| gv[o * inp + i] * av[k * inp + i])
                    .sum::<f32>();
            assert!((dbv[o * r + k] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn adapter_files_round_trip_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny(false);
    let base_dir = tmp.path().join("base");
    let base = crate::model::Qwen3Params::random(&cfg, 1, 0.1, &Device::Cpu)
        .unwrap()
        .to_host()
        .unwrap();
    crate::hf::save_checkpoint(
        &base_dir,
        &base,
        &crate::hf::SaveOptions::new(crate::hf::DiskDtype::F32).config(cfg.to_hf_json()),
    )
    .unwrap();
    std::fs::write(base_dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(base_dir.join("generation_config.json"), "{}").unwrap();

    let lc = LoraConfig {
        dropout: 0.1,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
        ..LoraConfig::new(2, 3.0)
    };
    let mut ad = LoraAdapters::init(&cfg, &lc, 5).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for p in ad.pairs.values_mut() {
        p.b.data = rand_vec(&mut rng, p.b.data.len());
    }
    let dir = tmp.path().join("adapter");
    save_adapters(&dir, &lc, &ad, &base_dir).unwrap();
    assert!(is_adapter_dir(&dir) && !is_adapter_dir(&base_dir));
    assert!(dir.join("tokenizer.json").is_file() && !dir.join("generation_config.json").exists());
    assert!(
        save_adapters(&dir, &lc, &ad, &base_dir).is_err(),
        "never overwrites"
    );

    let (lc2, ad2) = read_adapters(&dir).unwrap();
    assert_eq!((lc2, &ad2), (lc.clone(), &ad));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(json["lora_alpha"], serde_json::json!(3));
    assert_eq!(json["peft_type"], "LORA");
    let base_abs = std::fs::canonicalize(&base_dir).unwrap();
    assert_eq!(
        json["base_model_name_or_path"],
        base_abs.display().to_string()
    );
    assert_eq!(base_model_dir(&dir).unwrap(), base_abs);

    // Merge: only the adapted weights change, by s·B·A.
    let merged = merged_weights(&base_dir, &dir).unwrap();
    assert_eq!(merged.len(), base.len());
    for (name, t) in &merged {
        match ad.pairs.get(name) {
            None => assert_eq!(t, &base[name], "{name}"),
            Some(p) => {
                let (o, i, r) = (p.b.shape[0], p.a.shape[1], 2);
                for oo in 0..o {
                    for ii in 0..i {
                        let ba: f32 = (0..r)
                            .map(|k| p.b.data[oo * r + k] * p.a.data[k * i + ii])
                            .sum();
                        let want = base[name].data[oo * i + ii] + 1.5 * ba;
                        assert!((t.data[oo * i + ii] - want).abs() < 1e-6, "{name}");
                    }
                }
            }
        }
    }
    let out = tmp.path().join("merged");
    merge_to_dir(&base_dir, &dir, &out).unwrap();
    assert_eq!(crate::hf::load_checkpoint(&out).unwrap(), merged);
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    assert!(out.join("generation_config.json").is_file());
    assert!(
        merge_to_dir(&base_dir, &dir, &out).is_err(),
        "never overwrites"
    );
}

/// Writes `adapter_config.json` with `patch` applied over a valid config, and an empty-but-valid weights file.
fn adapter_with(dir: &std::path::Path, patch: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = serde_json::json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "bias": "none", "base_model_name_or_path": null
    });
    for (k, v) in patch.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), cfg.to_string()).unwrap();
    let mut t = TensorMap::new();
    t.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
        HostTensor::zeros(vec![2, 32]),
    );
    t.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
        HostTensor::zeros(vec![32, 2]),
    );
    crate::train::write_f32_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &t).unwrap();
}

#[test]
fn unsupported_adapter_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    adapter_with(&tmp.path().join("ok"), serde_json::json!({}));
    let (c, a) = read_adapters(tmp.path().join("ok")).unwrap();
    assert_eq!(
        (c.rank, c.alpha, a.scaling, a.pairs.len()),
        (2, 4.0, 2.0, 1)
    );
    let e = base_model_dir(tmp.path().join("ok"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no base_model_name_or_path"), "{e}");

    // A regular expression is replaced by the modules the file adapts.
    adapter_with(
        &tmp.path().join("re"),
        serde_json::json!({"target_modules": ".*\\.q_proj"}),
    );
    let (c, _) = read_adapters(tmp.path().join("re")).unwrap();
    assert_eq!(
        c.target_modules,
        TargetModules::Names(vec!["model.layers.0.self_attn.q_proj".into()])
    );

    for (i, (patch, key)) in [
        (serde_json::json!({"peft_type": "IA3"}), "peft_type"),
        (serde_json::json!({"r": 0}), "`r`"),
        (serde_json::json!({"use_rslora": true}), "use_rslora"),
        (serde_json::json!({"use_dora": true}), "use_dora"),
        (serde_json::json!({"bias": "all"}), "bias"),
        (
            serde_json::json!({"fan_in_fan_out": true}),
            "fan_in_fan_out",
        ),
        (
            serde_json::json!({"rank_pattern": {"q_proj": 8}}),
            "rank_pattern",
        ),
        (
            serde_json::json!({"modules_to_save": ["lm_head"]}),
            "modules_to_save",
        ),
        (serde_json::json!({"lora_dropout": 1.5}), "dropout"),
        (serde_json::json!({"r": 3}), "lora_A"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("bad{i}"));
        adapter_with(&dir, patch.clone());
        let e = read_adapters(&dir).unwrap_err().to_string();
        assert!(e.contains(key), "{patch}: {e}");
    }
}
