//! Serving through the cluster: `kind: serve` jobs (an OpenAI-compatible inference worker on a model dir or a
//! LoRA checkpoint) and `serve_after_training: true` on training jobs (rank 0 serves the final checkpoint once
//! training has finished). Both read the `serve:` block; the endpoint appears in `qctl status` as the result
//! `endpoint`. A serving job runs until it is cancelled.

use serde::{Deserialize, Serialize};

use crate::{JobKind, JobSpec};

/// The `serve:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    /// `kind: serve`: the HF model dir, or a LoRA checkpoint (its `adapter_config.json` names the base).
    /// Training jobs serve their final checkpoint and must not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// LoRA adapters merged into `model` at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<String>,
    /// Port on the node's address; 0 picks a free one (the endpoint in the status says which).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Model id in `/v1/models` and requests (default: the model dir's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Split Qwen3's `<think>` block into `reasoning_content`.
    #[serde(default)]
    pub reasoning_parser: bool,
    /// A file holding the API key clients must send as `Authorization: Bearer` (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
}

fn default_port() -> u16 {
    8000
}

impl Default for ServeSpec {
    fn default() -> Self {
        ServeSpec {
            model: None,
            adapters: None,
            port: default_port(),
            served_model_name: None,
            reasoning_parser: false,
            api_key_file: None,
        }
    }
}

/// Checks the serving keys of `spec`; errors are `(key, message)`.
pub(crate) fn validate(spec: &JobSpec) -> Result<(), (String, String)> {
    let err = |key: &str, m: &str| Err((key.to_string(), m.to_string()));
    let block_set = spec.serve.is_some();
    match spec.kind {
        JobKind::Serve => {
            let Some(s) = &spec.serve else {
                return err("serve", "missing: a serve job needs `serve: {model: DIR}`");
            };
            if s.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
                return err("serve.model", "missing: the model dir (or LoRA checkpoint) to serve");
            }
            if spec.world_size() != 1 {
                return err("resources", "a serve job runs one inference worker: `resources: {ranks: 1}` or one GPU");
            }
            if spec.serve_after_training.is_some() {
                return err("serve_after_training", "is for training jobs; a serve job always serves");
            }
        }
        k if k.is_training() => {
            if block_set && !spec.serve_after_training.unwrap_or(false) {
                return err("serve", "a training job reads `serve:` only with `serve_after_training: true`");
            }
            if let Some(s) = &spec.serve
                && (s.model.is_some() || s.adapters.is_some())
            {
                return err("serve.model", "a training job serves its own final checkpoint; remove serve.model/adapters");
            }
        }
        _ => {
            if block_set {
                return err("serve", &format!("kind `{}` does not serve", spec.kind));
            }
            if spec.serve_after_training.is_some() {
                return err("serve_after_training", &format!("kind `{}` does not train", spec.kind));
            }
        }
    }
    Ok(())
}
