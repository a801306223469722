"""Run ``drorebel.trainer.loop.train`` on every YAML config given, in order, in one launch.

Launched by tests/test_trainer_distributed.py under ``deepspeed --num_gpus 2 --no_local_rank``
(or ``torchrun``) so that several runs (full, interrupted, resumed, ZeRO-2, from_pretrained)
share one process start-up and DeepSpeed's JIT-built communication op.
"""

from __future__ import annotations

import sys

from common import finish

from drorebel.trainer.config import TrainConfig
from drorebel.trainer.engine import close_process_group
from drorebel.trainer.loop import train


def main() -> None:
    for path in sys.argv[1:]:
        train(TrainConfig.from_yaml(path))
    close_process_group()
    finish()  # no interpreter finalization: it can abort a finished rank (common.finish)


if __name__ == "__main__":
    main()
