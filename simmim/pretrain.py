"""SimMIM pretraining of Swin Transformer V2: ``python -m simmim.pretrain [recipe=NAME] [key=value ...]``.

Recipes live in ``recipes/pretrain/`` (``--help`` lists every key with its default); ``resume=auto run_dir=PATH``
continues a run exactly. In Python: ``simmim.cli.pretrain.run(simmim.cli.recipes.load_recipe("pretrain", [...]))``,
the LightningModule is :class:`simmim.training.pretrain.SimMIMPretrainModule`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from simmim import runtime

    runtime.prepare_process()  # before torch loads
    from simmim.cli.command import command_line

    return command_line("pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
