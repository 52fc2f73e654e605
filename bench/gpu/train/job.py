# job.py NAME CONFIG DATA OUT SEQ MBS GBS ITERS [extra yaml lines...]: a random-init pretrain job spec on stdout.
# Also imported by bench/gpu/scale/scale.py (job_yaml).
import sys


def job_yaml(name, cfg, data, out, seq, mbs, gbs, iters, extra="", save_steps=None):
    """The job spec: Qwen3 random init from `cfg`, lr 3e-4 with 2 warm-up steps, a metrics line every step,
    one checkpoint at the end (or every `save_steps`), seed 11; `extra` yaml lines appended."""
    return f"""name: {name}
kind: pretrain
resources: {{ranks: 1}}
init: random
model_config: {cfg}
dataset: {data}
output_dir: {out}
max_length: {seq}
micro_batch_size: {mbs}
global_batch_size: {gbs}
lr: 3.0e-4
lr_warmup_iters: 2
train_iters: {iters}
save_steps: {save_steps or iters}
logging_steps: 1
seed: 11
{extra}"""


if __name__ == "__main__":
    print(job_yaml(*sys.argv[1:9], extra="\n".join(sys.argv[9:])))
