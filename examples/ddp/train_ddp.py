"""Trains a regression MLP with DistributedDataParallel (gloo, CPU) on any fields.

    torchrun --standalone --nproc_per_node 2 examples/ddp/train_ddp.py \\
        --train 'data/radio/train-*.lmdb' --epochs 4 --checkpoint ckpt.pt
    python3 examples/ddp/train_ddp.py --nproc 2 --train data/converted.lmdb \\
        --inputs image aux --target label

``--inputs`` are the tensor fields the model sees (each flattened, then
concatenated), ``--target`` the field it predicts (default: the radio
example's ``cir rssi`` -> ``position``); both are standardized with the mean
and standard deviation of the first samples, so any database works, a
converted one included. Without a launcher (no ``RANK`` in the environment)
the script starts ``--nproc`` ranks itself, meeting through a file (no
network store). Under a launcher (torchrun, or one process per rank with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) it uses its variables, and
turns libuv off where this torch was built without it (Debian 13's torch
2.6: "use_libuv was requested but PyTorch was build without libuv support").
Each rank reads its share of every epoch through
``torch_lmdb.make_loader`` (rank and world size come from torch.distributed):
one seeded global order per epoch, every sample once per epoch over all ranks,
equal batch counts per rank. With ``--checkpoint`` rank 0 saves the model, the
optimizer and the loader's ``state_dict()`` every ``--save-every`` steps and at
each epoch's end; ``--resume`` continues from it mid-epoch, on any number of
ranks (the rest of the epoch is re-split across them). ``--stop-after N``
stops after N steps (to try a resume). ``--loader-only`` times ``--epochs`` passes of the
loader alone on each rank. Rank 0 prints a final ``RESULT {json}`` line.
"""
import argparse
import glob
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torch_lmdb

STATS_SAMPLES = 512  # samples that set the standardization (the first ones: the same on every rank)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, nargs="+", help="torch_lmdb databases (globs allowed)")
    p.add_argument("--inputs", nargs="+", default=["cir", "rssi"], help="tensor fields the model sees")
    p.add_argument("--target", default="position", help="tensor field the model predicts")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks to start when no launcher set RANK (they meet through a file)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--checkpoint", help="file for the model, optimizer and loader states")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: at epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--loader-only", action="store_true",
                   help="time --epochs loader passes per rank (after one warm-up pass), no training")
    return p.parse_args()


def expand(patterns):
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        out.extend(matches or [pattern])
    return out


def param_digest(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]  # 48 bits: exact in gather()'s float64


def save(path, model, opt, loader, steps):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict(),
                "steps": steps}, tmp)
    os.replace(tmp, path)  # a crash mid-save keeps the previous checkpoint


# Every tensor handed to a collective, referenced until the process ends (see shutdown()).
_COLLECTIVE_TENSORS = []


def gather(*values):
    """Every rank's `values` (numbers), as one list per rank in rank order."""
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    _COLLECTIVE_TENSORS.extend([mine, *out])
    dist.all_gather(out, mine)
    return [o.tolist() for o in out]


def shutdown():
    """Ends the process group. torch 1.13's gloo worker thread drops a
    collective's tensors after marking it complete, so after its wait() (or a
    barrier) has returned, and dropping the last reference to a tensor Python
    has let go of needs the GIL. A process group destroyed at that moment (its
    destructor joins those threads while holding the GIL) never returns; a
    loaded machine makes the moment long. So no tensor of ours is ever the
    last reference a gloo thread holds: every tensor handed to a collective
    stays in _COLLECTIVE_TENSORS (a few per epoch), and a barrier (tensors of
    its own, no Python objects) ends every rank's use of the group first."""
    dist.barrier()
    dist.destroy_process_group()


def libuv_available() -> bool:
    """Whether this torch's TCPStore has libuv (torch >= 2.4 asks for it by
    default; Debian 13's torch 2.6 is built without it)."""
    try:
        store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, use_libuv=True)
    except TypeError:  # torch < 2.2: no libuv option, and no libuv store to ask for
        return True
    except RuntimeError:
        return False
    del store
    return True


def init_process_group(rank=None, world=None, store_file=None):
    """env:// under a launcher (libuv off where torch lacks it), else a file
    store shared by the ranks this script started."""
    if store_file is None:
        if "USE_LIBUV" not in os.environ and not libuv_available():
            os.environ["USE_LIBUV"] = "0"  # read by env://'s store in torch >= 2.4
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method="file://" + store_file, rank=rank, world_size=world)


class Standardize:
    """Flattens and concatenates fields, then standardizes them with the mean and
    standard deviation of the first samples of the dataset."""

    def __init__(self, ds, names):
        self.names = names
        first = ds.get_batch(list(range(min(len(ds), STATS_SAMPLES))))
        x = self.concat(first)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)

    def concat(self, batch):
        return torch.cat([batch[n].reshape(len(batch[n]), -1).to(torch.float32) for n in self.names], dim=1)

    def __call__(self, batch):
        return (self.concat(batch) - self.mean) / self.std


def make_model(inputs: int, outputs: int):
    return torch.nn.Sequential(torch.nn.Linear(inputs, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, outputs))


def main(rank=None, args=None, store_file=None):
    args = args or parse()
    init_process_group(rank, args.nproc, store_file)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.manual_seed(args.seed)  # identical initial weights (DDP also broadcasts rank 0's)
    ds = torch_lmdb.LMDBDataset(expand(args.train), fields=[*args.inputs, args.target])
    features, target = Standardize(ds, args.inputs), Standardize(ds, [args.target])
    loader = torch_lmdb.make_loader(ds, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.num_workers,
                                    persistent_workers=args.num_workers > 0)

    if args.loader_only:
        dist.barrier()
        samples = sum(len(b[args.target]) for b in loader)  # a warm-up pass
        t0 = time.perf_counter()
        samples = sum(len(b[args.target]) for _ in range(args.epochs) for b in loader)
        rate = samples / (time.perf_counter() - t0)
        rates = [{"rank": r, "samples": int(n), "samples_per_s": v} for r, (n, v) in enumerate(gather(samples, rate))]
        if rank == 0:
            print("RESULT " + json.dumps({"stage": "loader_only", "world_size": world, "ranks": rates}), flush=True)
        shutdown()
        return

    model = DistributedDataParallel(make_model(len(features.mean), len(target.mean)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint)
        model.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        loader.load_state_dict(ckpt["loader"])  # saved on any world size
        steps = ckpt["steps"]
        if rank == 0:
            print(f"resumed at epoch {loader.epoch}, position {ckpt['loader']['position']} "
                  f"(saved with world size {ckpt['loader']['world_size']}, now {world})", flush=True)

    losses, seen = [], []
    stopped = False
    while loader.epoch < args.epochs and not stopped:
        epoch = loader.epoch
        total, count = torch.zeros(2, dtype=torch.float64), 0
        t0 = time.perf_counter()
        for batch in loader:
            pred = model(features(batch))
            loss = torch.nn.functional.mse_loss(pred, target(batch))
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks
            opt.step()
            total += torch.tensor([float(loss) * len(pred), len(pred)], dtype=torch.float64)
            count += len(pred)
            steps += 1
            if args.checkpoint and rank == 0 and args.save_every and steps % args.save_every == 0:
                save(args.checkpoint, model.module, opt, loader, steps)
            if args.stop_after and steps >= args.stop_after:
                stopped = True
                break
        _COLLECTIVE_TENSORS.append(total)
        dist.all_reduce(total)  # the epoch's loss over all ranks
        counts = [int(c) for (c,) in gather(count)]
        if total[1] > 0:
            losses.append(float(total[0] / total[1]))
        seen.append(counts)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {losses[-1]:.5f}  samples per rank {counts}  "
                  f"({sum(counts) / (time.perf_counter() - t0):,.0f} samples/s over {world} ranks)", flush=True)
            if args.checkpoint and not stopped:
                save(args.checkpoint, model.module, opt, loader, steps)
    digests = ["%012x" % int(d) for (d,) in gather(int(param_digest(model.module), 16))]
    if rank == 0:
        print("RESULT " + json.dumps({"stage": "ddp", "world_size": world, "losses": losses,
                                      "samples_per_rank": seen, "param_digests": digests, "steps": steps,
                                      "num_samples": len(ds), "loader_state": loader.state_dict()}), flush=True)
    shutdown()


def launch(args):
    """Runs ``args.nproc`` ranks of main() in processes started here."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(main, args=(args, os.path.join(tmp, "store")), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    arguments = parse()
    if "RANK" in os.environ:  # a launcher's rank (torchrun's, or set by hand)
        main(args=arguments)
    else:
        launch(arguments)
