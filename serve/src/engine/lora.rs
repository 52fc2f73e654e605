//! LoRA adapters served beside the base model, chosen per request by name (`qctl serve --adapters NAME=DIR`, the
//! request's `model` field), without merging them into the base weights.
//!
//! Maths: for a base projection `y = x·Wᵀ` (`W [out, in]`) that adapter `a` adapts with `A [r, in]`,
//! `B [out, r]` and scaling `s = alpha / r` (PEFT's `lora_alpha / r`):
//!
//! ```text
//! y_t = x_t·Wᵀ + s·(x_t·Aᵀ)·Bᵀ     for every row t of a sequence that asked for adapter a
//! y_t = x_t·Wᵀ                     for every other row
//! ```
//!
//! which is exactly the projection through the merged weight `W + s·B·A` (what `qctl export --merge-lora` writes),
//! up to the order of the f32 sums. The engine concatenates the rows of all sequences of a step (see
//! [`super::model`]); the rows of one sequence are contiguous, so a step's rows are described by [`RowRun`]s
//! (`start`, `len`, adapter), and each adapted run costs two thin GEMMs (`[n, in]·[in, r]`, `[n, r]·[r, out]`).
//!
//! Invariants: every adapter was checked at load against the base model's parameter shapes (an adapter made for
//! another model is refused, naming the weight); only the dense projections of the attention and MLP blocks
//! (`q/k/v/o_proj`, `gate/up/down_proj` of a dense layer) can be served unmerged — an adapter of MoE experts or
//! the router is refused with a hint to merge it; factors live on the model's device in its dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qkernels::{DType, Device, Tensor, ops};
use qparallel::lora;

use super::error::EngineError;

/// An adapter's position in its [`AdapterSet`] (requests carry it).
pub type AdapterId = usize;

/// `rows [start, start + len)` of a step all use `adapter` (`None`: the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRun {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<AdapterId>,
}

/// One served adapter.
#[derive(Debug, Clone)]
struct ServedAdapter {
    name: String,
    dir: PathBuf,
    scaling: f32,
    /// `(A [r, in], B [out, r])` by the HF name of the base weight they adapt.
    pairs: BTreeMap<String, (Tensor, Tensor)>,
}

/// The adapters a server offers (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    adapters: Vec<ServedAdapter>,
}

/// The modules whose adapters are applied unmerged.
const SERVABLE: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn servable(weight: &str) -> bool {
    // `model.layers.<i>.<module>.weight`
    weight
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(_, module)| module.strip_suffix(".weight"))
        .is_some_and(|m| SERVABLE.contains(&m))
}

impl AdapterSet {
    /// Reads the PEFT adapter directories `specs` (`(name, dir)`), checks them against the base model's parameter
    /// shapes (`shape_of(hf_name)`), and uploads their factors to `device` in `dtype`. `base_name` is the name the
    /// base model is served under; an adapter may not take it, and names must be unique.
    pub fn load(
        specs: &[(String, PathBuf)],
        base_name: &str,
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
        device: &Device,
        dtype: DType,
    ) -> Result<AdapterSet, EngineError> {
        let mut adapters: Vec<ServedAdapter> = Vec::with_capacity(specs.len());
        for (name, dir) in specs {
            let bad = |reason: String| EngineError::InvalidConfig(format!("adapter `{name}` ({}): {reason}", dir.display()));
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '=') {
                return Err(bad("a name is non-empty, without spaces or `=`".into()));
            }
            if name == base_name {
                return Err(bad(format!("`{base_name}` is the base model's name")));
            }
            if adapters.iter().any(|a| &a.name == name) {
                return Err(bad("the name is given twice".into()));
            }
            let (_, set) = lora::read_adapters(dir).map_err(|e| bad(e.to_string()))?;
            let mut pairs = BTreeMap::new();
            for (weight, pair) in &set.pairs {
                if !servable(weight) {
                    return Err(bad(format!(
                        "`{weight}` is not one of the dense attention/MLP projections served unmerged; merge the \
                         adapters instead (`qctl export --adapters {} --merge-lora --out DIR`) and serve that model",
                        dir.display()
                    )));
                }
                let Some(shape) = shape_of(weight) else {
                    return Err(bad(format!("adapts `{weight}`, which the base model does not have")));
                };
                let (out, inp) = (shape[0], shape[1]);
                if pair.a.shape != [set.rank, inp] || pair.b.shape != [out, set.rank] {
                    return Err(bad(format!(
                        "`{weight}` is [{out}, {inp}] in the base model, the adapter has A {:?} and B {:?} (rank {})",
                        pair.a.shape, pair.b.shape, set.rank
                    )));
                }
                let upload = |t: &qparallel::hf::HostTensor| -> Result<Tensor, EngineError> {
                    let t = Tensor::from_f32(t.data.clone(), &t.shape, device)?;
                    Ok(if dtype == DType::F32 { t } else { t.to_dtype(dtype)? })
                };
                pairs.insert(weight.clone(), (upload(&pair.a)?, upload(&pair.b)?));
            }
            adapters.push(ServedAdapter {
                name: name.clone(),
                dir: dir.clone(),
                scaling: set.scaling,
                pairs,
            });
        }
        Ok(AdapterSet { adapters })
    }

    /// True when no adapter is served.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// How many adapters are served (ids are `0..len`).
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// The id of the adapter served as `name`.
    pub fn id(&self, name: &str) -> Option<AdapterId> {
        self.adapters.iter().position(|a| a.name == name)
    }

    /// `(name, directory)` of every adapter, in id order.
    pub fn list(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.adapters.iter().map(|a| (a.name.as_str(), a.dir.as_path()))
    }

    /// Adds the adapters' contributions to `y = x·Wᵀ` of the base weight `weight` (HF name): rows of runs whose
    /// adapter adapts `weight` get `+ s·(x·Aᵀ)·Bᵀ` (see the module docs). `x [T, in]`, `y [T, out]`; `runs`
    /// cover `0..T` in order. Returns `y` itself when no run's adapter touches `weight`.
    pub fn apply(&self, weight: &str, x: &Tensor, y: Tensor, runs: &[RowRun]) -> Result<Tensor, EngineError> {
        let pair_of = |r: &RowRun| r.adapter.and_then(|id| self.adapters.get(id)?.pairs.get(weight).map(|p| (id, p)));
        if !runs.iter().any(|r| pair_of(r).is_some()) {
            return Ok(y);
        }
        let mut pieces = Vec::with_capacity(runs.len());
        for r in runs {
            let rows = y.narrow(0, r.start, r.len)?;
            pieces.push(match pair_of(r) {
                None => rows,
                Some((id, (a, b))) => {
                    let xa = ops::linear_fwd(&x.narrow(0, r.start, r.len)?, a)?;
                    let delta = ops::linear_fwd(&xa, b)?.scale(self.adapters[id].scaling)?;
                    rows.add(&delta)?
                }
            });
        }
        let refs: Vec<&Tensor> = pieces.iter().collect();
        Ok(Tensor::cat(&refs, 0)?)
    }
}

/// Consecutive rows with the same adapter merged into one run: `chunks` gives `(rows, adapter)` per sequence of a
/// step, in row order.
pub fn row_runs(chunks: impl IntoIterator<Item = (usize, Option<AdapterId>)>) -> Vec<RowRun> {
    let mut runs: Vec<RowRun> = Vec::new();
    let mut start = 0;
    for (len, adapter) in chunks {
        match runs.last_mut() {
            Some(last) if last.adapter == adapter => last.len += len,
            _ => runs.push(RowRun { start, len, adapter }),
        }
        start += len;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours_with_the_same_adapter() {
        let runs = row_runs([(3, None), (1, Some(0)), (2, Some(0)), (1, None), (4, Some(1))]);
        assert_eq!(
            runs,
            vec![
                RowRun { start: 0, len: 3, adapter: None },
                RowRun { start: 3, len: 3, adapter: Some(0) },
                RowRun { start: 6, len: 1, adapter: None },
                RowRun { start: 7, len: 4, adapter: Some(1) },
            ]
        );
    }

    #[test]
    fn only_dense_projections_are_servable() {
        assert!(servable("model.layers.3.self_attn.q_proj.weight"));
        assert!(servable("model.layers.0.mlp.down_proj.weight"));
        assert!(!servable("model.layers.0.mlp.experts.1.down_proj.weight"));
        assert!(!servable("model.layers.0.mlp.gate.weight"));
        assert!(!servable("lm_head.weight"));
    }
}
