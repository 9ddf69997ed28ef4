"""Launched by test_fsdp.py: `train.main` under FSDP2 (full shard) on two CPU processes.

Accelerate runs FSDP only on accelerators: with ACCELERATE_USE_CPU=true it builds a DDP (MULTI_CPU) state and drops
the FSDP plugin the launcher configured. This TEST script switches that state to FSDP (private Accelerate state:
test code only), so that the same train.py code path a GPU user runs with examples/accelerate/fsdp.yaml is exercised
here on CPU: sharded model, sharded checkpoints, resume, the gathered export.

usage: accelerate launch --config_file fsdp_cpu.yaml fsdp_train_script.py <train.py arguments>
"""

from __future__ import annotations

import os
import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from hysac_hf import train
from hysac_hf.training import build_accelerator


def fsdp_accelerator_on_cpu(config) -> Accelerator:
    accelerator = build_accelerator(config)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        sys.exit("launch with an FSDP accelerate config (distributed_type: FSDP)")
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        sys.exit(f"expected Accelerate's CPU state (MULTI_CPU), got {accelerator.distributed_type}")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables set by `accelerate launch`
    if plugin.fsdp_version != 2:
        sys.exit("use fsdp_version: 2 (FSDP1 does not run on CPU)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


if __name__ == "__main__":
    config = train.parse_args(sys.argv[1:])
    train.main(config, accelerator=fsdp_accelerator_on_cpu(config))
