"""`tpext demo`: train the reference Llama-style model with tensor parallelism and check it against the
dense model.

Launches --nproc ranks (default 2) through torch.distributed's elastic launcher (gloo on CPU, NCCL with
one GPU per rank when GPUs are visible), or runs as one rank of an existing torchrun job. Every rank
builds the same dense model; one copy is parallelized over "tp" (and wrapped in DDP over "dp" when
--nproc > --tp), the other trains densely on the whole batch as the reference. Prints per-rank parameter
and activation memory, communication per layer, and step times; exits non-zero if the loss curves differ
by more than --rtol.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from tpext.models import PRESETS, LlamaConfig, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, default=2, help="ranks to launch (ignored under torchrun; default 2)"
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size (default: all ranks); the remaining factor is data parallel (DDP)",
    )
    parser.add_argument("--sp", action="store_true", help="sequence parallelism")
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="reference model preset")
    parser.add_argument(
        "--kv-heads", type=int, default=None, help="override the preset's kv head count (GQA)"
    )
    parser.add_argument("--packed", action="store_true", help="packed qkv_proj / gate_up_proj weights")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="loss-curve tolerance, relative (default 1e-4 for fp32, 1e-10 fp64, 3e-2 bf16)",
    )
    parser.add_argument(
        "--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with GPUs, else gloo"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tpext.commands.launch import launch, launched_by_torchrun

    if launched_by_torchrun():
        return _worker(args)
    if args.nproc < 1:
        raise SystemExit(f"tpext demo: --nproc must be >= 1, got {args.nproc}")
    statuses = launch(_worker, args.nproc, args)
    return max(statuses.values())


# ---- the job, on every rank ---------------------------------------------------------------------------


def _config(args) -> LlamaConfig:
    base = PRESETS[args.model].to_dict()
    if args.kv_heads is not None:
        base["num_key_value_heads"] = args.kv_heads
    base["packed"] = args.packed
    return LlamaConfig.from_dict(base)


def _batches(args, vocab: int, device) -> list[torch.Tensor]:
    """Synthetic sequences with a learnable rule (each token determines the next), the same on every rank."""
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.steps):
        start = torch.randint(0, vocab, (args.batch, 1), generator=g)
        steps = torch.arange(args.seq).unsqueeze(0)
        out.append(((start * 7 + steps * 13) % vocab).to(device))
    return out


class _ActivationMeter:
    """Bytes of the tensors autograd saves for backward (the activation memory), parameters excluded,
    each storage counted once."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def __enter__(self):
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params:
                self.storages[ptr] = t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _train(model, loss_of, batches, group, device, lr: float, progress):
    """AdamW on `batches`; return (losses, step times in s, activation bytes and comm records of step 1).
    group: the data-parallel group whose mean loss is reported (None: this rank alone)."""
    import tpext

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, times, act_bytes, comm = [], [], 0, None
    for i, ids in enumerate(batches):
        if group is not None:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with tpext.comm_stats() as stats, _ActivationMeter(model) as meter:
            loss = loss_of(model(ids), ids)
        with tpext.comm_stats() as bwd_stats:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0:
            act_bytes, comm = meter.nbytes, stats.records + bwd_stats.records
        loss = loss.detach().float().clone()
        if group is not None and group.size() > 1:  # mean over data-parallel ranks (equal batches)
            dist.all_reduce(loss, group=group)
            loss /= group.size()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses, times, act_bytes, comm


def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (parameters() lists a tied one once; a DTensor by its local shard)."""
    locals_ = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in locals_)


def _layer_of(module_name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'layer 3'; embeddings / head / loss keep their names."""
    parts = module_name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return f"layer {parts[parts.index('layers') + 1]}"
    return {"": "loss", "-": "loss"}.get(module_name, module_name)


def _comm_table(records) -> list[str]:
    rows: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        cell = rows[_layer_of(r.module)][f"{r.phase} {r.kind}"]
        cell[0] += 1
        cell[1] += r.nbytes
    kinds = sorted(
        {k for cols in rows.values() for k in cols}, key=lambda k: (not k.startswith("forward"), k)
    )
    lines = ["  " + f"{'where':<22}" + "".join(f"{k:>26}" for k in kinds)]
    for where in sorted(
        rows, key=lambda w: (not w.startswith("layer"), int(w.split()[1]) if w.startswith("layer") else 0, w)
    ):
        cells = [rows[where].get(k) for k in kinds]
        lines.append(
            "  "
            + f"{where:<22}"
            + "".join(f"{(f'{c[0]} x, {c[1] / 1024:,.1f} KiB' if c else '-'):>26}" for c in cells)
        )
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _worker(args) -> int:
    import tpext
    from tpext.commands.launch import init_worker

    rank, world = init_worker(args.backend)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    tp = args.tp or world
    if world % tp:
        raise SystemExit(f"tpext demo: --tp {tp} must divide the number of ranks {world}")
    dp = world // tp
    dtype = DTYPES[args.dtype]
    rtol = (
        args.rtol if args.rtol is not None else {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 3e-2)
    )
    cfg = _config(args)
    if args.batch % dp:
        raise SystemExit(f"tpext demo: --batch {args.batch} must be divisible by the data-parallel size {dp}")

    if dp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        tp_group, dp_group = mesh["tp"], mesh["dp"].get_group()
        dp_rank = mesh["dp"].get_local_rank()
    else:
        tp_group, dp_group, dp_rank = None, None, 0

    torch.manual_seed(args.seed)
    dense = LlamaForCausalLM(cfg, device=device, dtype=dtype)
    reference = copy.deepcopy(dense)
    model = tpext.parallelize(dense, tp_group, sequence_parallel=args.sp)
    loss_of = model.loss
    if dp > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=dp_group)

    batches = _batches(args, cfg.vocab_size, device)
    rows = args.batch // dp
    local = [ids[dp_rank * rows : (dp_rank + 1) * rows] for ids in batches]
    progress = None
    if rank == 0:
        from tqdm import tqdm

        print(
            f"tpext demo: {world} rank(s) on {dist.get_backend()}, tp={tp} dp={dp} sp={args.sp}, model "
            f"'{args.model}' ({sum(p.numel() for p in reference.parameters()) / 1e6:.2f} M params, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, "
            f"{'packed' if cfg.packed else 'unpacked'}), {args.dtype}, batch {args.batch} x seq {args.seq}",
            flush=True,
        )
        # disable=None: a bar on a terminal, nothing in a log file.
        progress = tqdm(
            total=2 * args.steps, desc="train (tp, then dense)", unit="step", leave=False, disable=None
        )
    tp_run = _train(model, loss_of, local, dp_group, device, args.lr, progress)
    dense_run = _train(reference, reference.loss, batches, None, device, args.lr, progress)
    if progress is not None:
        progress.close()

    mine = {"rank": rank, "params": _param_bytes(model), "act": tp_run[2]}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(tp_run[0], dense_run[0]))
    ok = worst <= rtol
    if rank == 0:
        _report(tp_run, dense_run, everyone, _param_bytes(reference), worst, rtol)
    dist.destroy_process_group()
    return 0 if ok else 1


def _report(
    tp_run: tuple, dense_run: tuple, everyone: list, dense_params: int, worst: float, rtol: float
) -> None:
    """Print the demo's outcome on rank 0. tp_run and dense_run are what `_train` returned for the
    tensor-parallel and the dense model; everyone is each rank's {rank, params, act}."""
    tp_losses, tp_times, _, comm = tp_run
    dense_losses, dense_times, dense_act, _ = dense_run
    print("\nloss per step (tensor-parallel vs dense):")
    for i, (a, b) in enumerate(zip(tp_losses, dense_losses)):
        print(f"  step {i + 1:>2}: {a:.6f}  {b:.6f}  (rel diff {abs(a - b) / max(abs(b), 1e-30):.1e})")
    print("\nmemory per rank (parameters; activations saved for backward in step 1):")
    print(f"  {'dense':<8}{_mib(dense_params):>14}{_mib(dense_act):>14}")
    for r in everyone:
        print(f"  rank {r['rank']:<3}{_mib(r['params']):>14}{_mib(r['act']):>14}")
    print("\ncommunication of one step on rank 0 (calls, bytes of the full tensors):")
    print("\n".join(_comm_table(comm)))
    print(
        f"\nstep time (median of {len(tp_times) - 1} after the first): tensor-parallel "
        f"{statistics.median(tp_times[1:] or tp_times) * 1e3:.1f} ms, dense (whole batch, one rank) "
        f"{statistics.median(dense_times[1:] or dense_times) * 1e3:.1f} ms"
    )
    verdict = "OK" if worst <= rtol else "FAILED"
    print(
        f"\nloss check: {verdict}: largest relative difference {worst:.2e} (tolerance {rtol:.0e})", flush=True
    )


if __name__ == "__main__":  # pragma: no cover - use `python -m tpext demo`
    raise SystemExit("run `python -m tpext demo`")
