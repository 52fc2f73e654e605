"""Reference all-to-all bandwidth with torch.distributed (NCCL), one process per visible GPU.

Usage: python torch_all_to_all.py [MiB]   (MiB of bf16 per rank, default 512)

Each rank's buffer of S bytes is split into n equal chunks and chunk j goes to rank j
(dist.all_to_all_single). Bandwidths as nccl-tests alltoall: algbw = S / t, busbw = algbw * (n - 1) / n,
with t the mean of 10 timed iterations after 3 warm-up ones, measured on rank 0 around a device sync.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP, ITERS = 3, 10


def worker(rank, world, mib):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = "29512"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    # Whole bf16 elements, and a multiple of the world size so the chunks are equal.
    elems = (mib * 2**20 // 2) // world * world
    nbytes = elems * 2
    send = torch.randn(elems, dtype=torch.bfloat16, device="cuda")
    recv = torch.empty_like(send)

    for _ in range(WARMUP):
        dist.all_to_all_single(recv, send)
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(ITERS):
        dist.all_to_all_single(recv, send)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - start) / ITERS

    if rank == 0:
        algbw = nbytes / sec / 1e9
        busbw = algbw * (world - 1) / world
        print(f"torch all_to_all {mib} MiB bf16 x{world}: {sec * 1e3:.2f} ms "
              f"algbw {algbw:.0f} GB/s busbw {busbw:.0f} GB/s", flush=True)
    dist.destroy_process_group()


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    world = torch.cuda.device_count()
    if world < 1:
        sys.exit("torch_all_to_all.py: no CUDA device")
    mp.spawn(worker, args=(world, mib), nprocs=world, join=True)


if __name__ == "__main__":
    main()
