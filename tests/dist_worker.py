"""What tests/test_distributed.py launches with torchrun: train.py's run, plus measurements of the sharded
model that only a live process group can take.

    torchrun --nproc_per_node=2 tests/dist_worker.py --stage sft --config cfg.toml [--set k=v ...]
        [--report report.json]

The report (written by rank 0) holds, per rank, the parameter bytes held locally vs unsharded (of the
trained model, and of each frozen model: [local, full] per entry of stage.frozen_modules(), before and
after training), the bytes of weights this rank read from model directories while building, and the
logits of the trained sharded model on a fixed batch (for comparison with the exported HF directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirlhf import checkpoint, distributed
from minirlhf.config import load_config
from minirlhf.model import Transformer
from train import build_trainer

torch.set_num_threads(1)  # two ranks on two shared cores

PROBE = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6, 7, 8]])


def count_weight_bytes(read_tensors, counter: list[int]):
    """checkpoint.read_tensors, adding the bytes of every tensor it yields to counter[0]."""
    def counted(file):
        for name, tensor in read_tensors(file):
            counter[0] += tensor.numel() * tensor.element_size()
            yield name, tensor
    return counted


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--report", default=None)
    args = p.parse_args()
    cfg = load_config(args.config, args.set, stage=args.stage)
    try:
        measure(cfg, args.report)
    except BaseException:
        distributed.close(barrier=False)  # no abort in interpreter teardown: the error stays the message
        raise
    distributed.close()


def measure(cfg, report_path: str | None) -> None:
    weight_bytes = [0]  # read from the model directories' weight files by this rank while building
    checkpoint.read_tensors = count_weight_bytes(checkpoint.read_tensors, weight_bytes)
    trainer = build_trainer(cfg)
    ctx = trainer.dist
    local, full = distributed.local_parameter_bytes(trainer.stage.model)
    frozen = [list(distributed.local_parameter_bytes(m)) for m in trainer.stage.frozen_modules()]
    summary = trainer.fit()
    # and after training: the frozen models gave back the full weights they gathered (distributed.reshard)
    frozen_after = [list(distributed.local_parameter_bytes(m)) for m in trainer.stage.frozen_modules()]
    report = {"summary": summary, "world_size": ctx.world_size}
    model = trainer.stage.model
    if isinstance(model, Transformer):
        model.eval()
        with torch.no_grad():
            logits = model(PROBE.to(ctx.device))
        report["logits"] = logits.float().cpu().tolist()
    rows = [None] * ctx.world_size
    dist.all_gather_object(rows, {"rank": ctx.rank, "local_bytes": local, "full_bytes": full,
                                  "frozen": frozen, "frozen_after": frozen_after, "weight_bytes": weight_bytes[0]})
    report["memory"] = rows
    if ctx.is_main and report_path:
        Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
