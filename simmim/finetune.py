"""Fine-tuning, linear probing and kNN evaluation: ``python -m simmim.finetune [recipe=NAME] pretrained=PATH ...``.

Recipes live in ``recipes/finetune/`` (``--help`` lists every key with its default); ``mode`` picks finetune,
linear_probe or knn; ``resume=auto run_dir=PATH`` continues a run exactly. In Python:
``simmim.cli.finetune.run(simmim.cli.recipes.load_recipe("finetune", [...]))``; the LightningModules are in
:mod:`simmim.training.classify`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from simmim import runtime

    runtime.prepare_process()  # before torch loads
    from simmim.cli.command import command_line

    return command_line("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
