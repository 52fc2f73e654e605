# job.py NAME CONFIG DATA OUT SEQ MBS GBS ITERS [extra yaml lines...]
import sys
name, cfg, data, out, seq, mbs, gbs, iters = sys.argv[1:9]
extra = "\n".join(sys.argv[9:])
print(f"""name: {name}
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
save_steps: {iters}
logging_steps: 1
seed: 11
{extra}""")
