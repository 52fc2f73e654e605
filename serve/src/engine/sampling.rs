//! Token sampling: penalties, temperature, top-k, top-p, seeded randomness; greedy at temperature 0.
//!
//! Order of operations on the `[vocab]` logits of one sequence (as vLLM / HF apply them):
//! 1. repetition penalty (HF/CTRL): for every token seen in prompt or output, `l > 0 ? l/r : l·r`;
//! 2. presence / frequency penalty (OpenAI): `l -= presence·[count > 0] + frequency·count` over output tokens;
//! 3. `temperature == 0` → argmax (lowest id on ties), done;
//! 4. `l /= temperature`; keep the `top_k` largest (0 = all); softmax; keep the smallest prefix of tokens by
//!    descending probability whose mass reaches `top_p`; renormalise and draw with the sequence's RNG.
//!
//! A request with a `seed` gets its own `StdRng` seeded with it, so its samples do not depend on what else is
//! batched; without one the RNG is seeded from the OS.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// HF repetition penalty, 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty, 0 = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, 0 = off.
    pub frequency_penalty: f32,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (besides the model's EOS ids unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks ranges; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// Per-sequence sampler state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Output-token counts (presence/frequency penalties).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for one sequence.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            counts: HashMap::new(),
        }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when [`Sampler::sample`] is a plain argmax of the logits (temperature 0, no penalties), so the
    /// engine may take the token from the device's argmax instead ([`Sampler::record`]).
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// Books `token` as sampled (what [`Sampler::sample`] does after picking it).
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token from `logits` (modified in place) given the prompt and the output so far.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                let t = t as usize;
                if t < logits.len() && !seen[t] {
                    seen[t] = true;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        let token = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.counts.entry(token).or_insert(0) += 1;
        token
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k.min(idx.len()));
        }
        let max = logits[idx[0]] / p.temperature;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] / p.temperature - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (n, &x) in probs.iter().enumerate() {
            if u < x {
                return idx[n] as u32;
            }
            u -= x;
        }
        idx[probs.len() - 1] as u32
    }
}

/// Index of the largest value, the lowest index on ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_lowest_tie() {
        let mut s = Sampler::new(SamplingParams::greedy(4));
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 2.0], &[], &[]), 1);
    }

    #[test]
    fn repetition_penalty_moves_greedy_away_from_seen_tokens() {
        let mut p = SamplingParams::greedy(4);
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(p);
        // 3.0/2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0], &[0], &[]), 1);
    }

    #[test]
    fn presence_penalty_applies_to_generated_tokens_only() {
        let mut p = SamplingParams::greedy(4);
        p.presence_penalty = 1.5;
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [1.0, 0.0], &[], &[]), 0);
        // token 0 now generated once: 1.0 - 1.5 < 0.0
        assert_eq!(s.sample(&mut [1.0, 0.0], &[], &[0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let mut p = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p.clone());
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4], &[], &[]), 1);
        }
        p.top_k = 0;
        let draws = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3], &[], &[]))
                .collect::<Vec<_>>()
        };
        let a = draws(&p);
        assert_eq!(a, draws(&p));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 1,
            "temperature sampling should vary: {a:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(7),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        // probs ≈ [0.84, 0.11, 0.04, ...]: the nucleus for 0.5 is token 0 only.
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[], &[]), 0);
        }
    }
}
