"""torchrun entry point: ``torchrun --nproc-per-node P -m brigade.engine.launch <train flags>``.

Every rank runs the same training job (``brigade train`` flags) with the torchrun backend:
one pipeline worker per rank. Rank 0 shows the progress bar, prints the report and writes
``--json``, ``--save`` and ``--trace``; the other ranks stay quiet.
"""

from __future__ import annotations

import argparse
import sys

from .cli import _usage_errors
from .cli import train_cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brigade.engine.launch",
        description="One pipeline rank of `brigade train --backend torchrun`.")
    train_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    args.backend = "torchrun"
    from .torchrun_backend import init_torchrun, is_rank0

    try:
        init_torchrun()
        args.quiet = args.quiet or not is_rank0()
        return train_cmd.run_here(args)
    except _usage_errors() as err:
        if is_rank0():
            print(f"brigade train (torchrun): error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
