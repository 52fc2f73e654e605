//! Local commands that run the training engine in this process (no coordinator):
//! `qctl train job.yaml --local` and `qctl logits`.

use clap::Args;
use std::path::PathBuf;

/// `qctl train JOB.yaml --local`
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The job spec (kind: pretrain).
    pub job: PathBuf,
    /// Run in this process instead of submitting to a coordinator.
    #[arg(long)]
    pub local: bool,
}

/// `qctl logits --model DIR --tokens FILE.json`
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A JSON list of lists of token ids.
    #[arg(long)]
    pub tokens: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the logits (safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("qctl train is not implemented yet ({:?})", args.job)
}

pub fn logits(args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::bail!("qctl logits is not implemented yet ({:?})", args.model)
}
