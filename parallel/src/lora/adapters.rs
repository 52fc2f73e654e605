//! Adapter tensors: target resolution, initialisation, PEFT key names, the effective weight and the adapter
//! gradients (see the module docs of [`crate::lora`] for the maths).

use std::collections::BTreeMap;
use std::path::Path;

use qkernels::{Device, KernelError, Tensor, ops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{LoraConfig, TargetModules, name_matches};
use super::{LoraError, Result};
use crate::hf::{HostTensor, TensorMap};
use crate::model::{ModelConfig, param_shapes};

/// Prefix PEFT puts before the base model's module names in `adapter_model.safetensors`.
const PEFT_PREFIX: &str = "base_model.model.";

/// One adapter: `A [r, in]`, `B [out, r]` for a base weight `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: HostTensor,
    pub b: HostTensor,
}

/// The adapters of a model: one [`LoraPair`] per adapted weight, keyed by the base weight's HF name
/// (`model.layers.0.self_attn.q_proj.weight`), all of rank `rank`, applied with factor `scaling = alpha / rank`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapters {
    pub rank: usize,
    pub scaling: f32,
    pub pairs: BTreeMap<String, LoraPair>,
}

/// The PEFT key of the `A` (`part = "lora_A"`) or `B` (`"lora_B"`) factor adapting the HF weight `weight`:
/// `model.layers.0.self_attn.q_proj.weight` → `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(weight: &str, part: &str) -> String {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    format!("{PEFT_PREFIX}{module}.{part}.weight")
}

/// The inverse of [`peft_key`]: `(HF weight name, is_a)`, or `None` for a key that is not a LoRA factor.
pub fn parse_peft_key(key: &str) -> Option<(String, bool)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, false)
    } else {
        return None;
    };
    if module.is_empty() {
        return None;
    }
    Some((format!("{module}.weight"), is_a))
}

/// `(HF name, [out, in])` of every weight of `model` that `targets` selects, in HF-name order.
///
/// Only 2-D weights inside the decoder layers can carry adapters; a target name that matches something else
/// (embeddings, `lm_head`, a norm) or nothing at all is an error naming it.
pub fn target_weights(
    model: &ModelConfig,
    targets: &TargetModules,
) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = param_shapes(model);
    let key = "lora.target_modules";
    let mut out = Vec::new();
    for (name, shape) in &shapes {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if !targets.matches(module) {
            continue;
        }
        let adaptable = name.starts_with("model.layers.") && shape.len() == 2;
        if !adaptable {
            return Err(LoraError::Invalid {
                key,
                reason: format!(
                    "`{targets}` selects `{module}`, which cannot carry a LoRA adapter (only the linear layers \
                     of the decoder layers can; not embeddings, lm_head or norms)"
                ),
            });
        }
        out.push((name.clone(), shape.clone()));
    }
    if let TargetModules::Names(names) = targets {
        for n in names {
            let hit = shapes
                .iter()
                .any(|(name, _)| name_matches(n, name.strip_suffix(".weight").unwrap_or(name)));
            if !hit {
                return Err(LoraError::Invalid {
                    key,
                    reason: format!("`{n}` matches no module of this model"),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(LoraError::Invalid {
            key,
            reason: format!("`{targets}` selects no linear layer of this model"),
        });
    }
    out.sort();
    Ok(out)
}

impl LoraAdapters {
    /// Fresh adapters for `config` on `model` (PEFT's default init, see the module docs): `A` uniform in
    /// `[-1/√in, 1/√in)` from `StdRng::seed_from_u64(seed)`, targets in HF-name order, `B = 0`.
    pub fn init(model: &ModelConfig, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let r = config.rank;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for (name, shape) in target_weights(model, &config.target_modules)? {
            let (out, inp) = (shape[0], shape[1]);
            // kaiming_uniform_(a=√5): gain = √(2/(1+a²)) = √(1/3), bound = gain·√(3/fan_in) = 1/√fan_in.
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| bound * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            pairs.insert(
                name,
                LoraPair {
                    a: HostTensor {
                        shape: vec![r, inp],
                        data: a,
                    },
                    b: HostTensor::zeros(vec![out, r]),
                },
            );
        }
        Ok(LoraAdapters {
            rank: r,
            scaling: config.scaling(),
            pairs,
        })
    }

    /// The tensors under their PEFT keys (what `adapter_model.safetensors` holds).
    pub fn to_peft_tensors(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (name, p) in &self.pairs {
            out.insert(peft_key(name, "lora_A"), p.a.clone());
            out.insert(peft_key(name, "lora_B"), p.b.clone());
        }
        out
    }

    /// Adapters from tensors under PEFT keys; `origin` names the file in errors. Every key must be a `lora_A` /
    /// `lora_B` factor, each weight needs both, with `A [rank, in]` and `B [out, rank]`.
    pub fn from_peft_tensors(
        rank: usize,
        scaling: f32,
        tensors: TensorMap,
        origin: &Path,
    ) -> Result<Self> {
        let bad = |tensor: &str, reason: String| LoraError::AdapterTensor {
            path: origin.to_path_buf(),
            tensor: tensor.to_string(),
            reason,
        };
        let mut halves: BTreeMap<String, (Option<HostTensor>, Option<HostTensor>)> =
            BTreeMap::new();
        for (key, t) in tensors {
            let Some((weight, is_a)) = parse_peft_key(&key) else {
                return Err(bad(
                    &key,
                    "not a LoRA factor (`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`); \
                     DoRA, bias, embedding adapters and modules_to_save are not supported"
                        .into(),
                ));
            };
            let slot = halves.entry(weight).or_default();
            if is_a { &mut slot.0 } else { &mut slot.1 }.replace(t);
        }
        let mut pairs = BTreeMap::new();
        for (weight, (a, b)) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, _) => return Err(bad(&peft_key(&weight, "lora_A"), "missing".into())),
                (_, None) => return Err(bad(&peft_key(&weight, "lora_B"), "missing".into())),
            };
            if a.shape.len() != 2 || a.shape[0] != rank {
                return Err(bad(
                    &peft_key(&weight, "lora_A"),
                    format!("shape {:?}, expected [r = {rank}, in]", a.shape),
                ));
            }
            if b.shape.len() != 2 || b.shape[1] != rank {
                return Err(bad(
                    &peft_key(&weight, "lora_B"),
                    format!("shape {:?}, expected [out, r = {rank}]", b.shape),
                ));
            }
            pairs.insert(weight, LoraPair { a, b });
        }
        if pairs.is_empty() {
            return Err(LoraError::AdapterTensor {
                path: origin.to_path_buf(),
                tensor: "*".into(),
                reason: "no LoRA tensors".into(),
            });
        }
        Ok(LoraAdapters {
            rank,
            scaling,
            pairs,
        })
    }

    /// Checks that every adapted weight exists in `shapes` (HF name → shape) as `[B.rows, A.cols]`.
    pub fn check_against<'a>(&self, shape_of: impl Fn(&str) -> Option<&'a [usize]>) -> Result<()> {
        for (name, p) in &self.pairs {
            let want = [p.b.shape[0], p.a.shape[1]];
            match shape_of(name) {
                None => {
                    return Err(LoraError::Mismatch {
                        weight: name.clone(),
                        reason: "the base model has no such weight".into(),
                    });
                }
                Some(s) if s != want => {
                    return Err(LoraError::Mismatch {
                        weight: name.clone(),
                        reason: format!(
                            "base weight has shape {s:?}, the adapter (B {:?} · A {:?}) needs {want:?}",
                            p.b.shape, p.a.shape
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Replaces every adapted weight `W` of `base` by `W + scaling·B·A` ([`effective_weight`] on the CPU).
    pub fn merge_into(&self, base: &mut TensorMap) -> Result<()> {
        self.check_against(|n| base.get(n).map(|t| t.shape.as_slice()))?;
        let cpu = Device::Cpu;
        for (name, p) in &self.pairs {
            let w = base.get_mut(name).expect("checked above");
            let wt = Tensor::from_f32(std::mem::take(&mut w.data), &w.shape, &cpu)?;
            let a = Tensor::from_f32(p.a.data.clone(), &p.a.shape, &cpu)?;
            let b = Tensor::from_f32(p.b.data.clone(), &p.b.shape, &cpu)?;
            w.data = effective_weight(&wt, &a, &b, self.scaling)?.to_vec_f32()?;
        }
        Ok(())
    }
}

/// `W' = W + s·(B·A)`: `w [out, in]`, `a [r, in]`, `b [out, r]`, on `w`'s device.
pub fn effective_weight(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
) -> std::result::Result<Tensor, KernelError> {
    w.add(&ops::matmul(b, a)?.scale(scaling)?)
}

/// Adapter gradients from the gradient `g = dL/dW' [out, in]` of the effective weight:
/// `(dL/dA, dL/dB) = (s·Bᵀ·G [r, in], s·G·Aᵀ [out, r])`.
pub fn adapter_grads(
    g: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
) -> std::result::Result<(Tensor, Tensor), KernelError> {
    let da = ops::matmul(&b.transpose(0, 1)?, g)?.scale(scaling)?;
    let db = ops::linear_fwd(g, a)?.scale(scaling)?;
    Ok((da, db))
}
