"""One config drives every command: the parser of ``visiontune fit``, plus one tool's own options.

``visiontune check-data``, ``schedule``, ``lr-find`` and ``compare`` read the file that ``visiontune fit --config``
takes, with the same ``--model.*`` / ``--data.*`` / ``--trainer.*`` overrides, through the same jsonargparse parser
(LightningCLI's, as :class:`~visiontune.cli.lightning_cli.VisionTuneCLI` builds it). A tool adds its own options
(``--json``, ``--num_training``, ``--strategies``, ...) next to those and takes what it needs of the rest: a config
that trains also checks its data, prints its schedule, finds its learning rate and compares strategies on it. A
key none of them knows, in the file or on the command line, is one error naming it (exit 2), the same for all.

Parsing instantiates nothing (no weights are read, no data scanned); a tool that needs the model, the data and the
trainer as ``fit`` would build them calls :meth:`ToolCLI.instantiate`.

    from visiontune.cli.config import ToolCLI
    cli = ToolCLI("visiontune my-tool", ["--config", "configs/finetune.yaml", "--data.image_size", "32"],
                  lambda parser: parser.add_argument("--n", type=int, default=3))
    cli.config.data.train, cli.config.n
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from .lightning_cli import VisionTuneCLI

__all__ = ["ToolCLI"]


class ToolCLI(VisionTuneCLI):
    """:class:`~visiontune.cli.lightning_cli.VisionTuneCLI` without sub-commands, for one of visiontune's tools.

    Args:
        prog: the command's name in messages (``"visiontune check-data"``).
        args: the command line after the tool's name.
        options: adds the tool's own arguments to the parser (``parser.add_argument(...)``).
        description: the ``--help`` text.

    ``self.config`` is the parsed configuration (``config.model``, ``config.data``, ``config.trainer``,
    ``config.seed_everything`` and the tool's options); :meth:`given` what of it the user set; ``self.parser``
    the parser.
    """

    def __init__(self, prog: str, args: Sequence[str], options: Optional[Callable[[Any], None]] = None, *,
                 description: str = "") -> None:
        self._tool = (prog, options, description)
        self._parse_only = True
        super().__init__(args=list(args), run=False)

    def init_parser(self, **kwargs):  # type: ignore[override]
        prog, _, description = self._tool
        kwargs.setdefault("prog", prog)
        if description:
            kwargs.setdefault("description", description)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[override]
        super().add_arguments_to_parser(parser)
        options = self._tool[1]
        if options is not None:
            options(parser)

    # LightningCLI's steps after parsing run only in instantiate()
    def _set_seed(self) -> None:
        if not self._parse_only:
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        if not self._parse_only:
            super().before_instantiate_classes()

    def instantiate_classes(self) -> None:
        if not self._parse_only:
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        if not self._parse_only:
            super().after_instantiate_classes()

    def instantiate(self) -> "ToolCLI":
        """Build ``self.model``, ``self.datamodule`` and ``self.trainer`` from the config, as ``fit`` would
        (seeded with ``seed_everything``); returns ``self``."""
        self._parse_only = False
        self._set_seed()
        self.before_instantiate_classes()
        self.instantiate_classes()
        self.after_instantiate_classes()
        return self

    def parse_arguments(self, parser, args) -> None:  # type: ignore[override]
        import sys

        # ``args`` are the tool's part of sys.argv: not the "args and sys.argv both given" LightningCLI warns about
        saved, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = saved
        # what the config file and the command line set, without the defaults (the same arguments: no new error)
        self.given_config = parser.parse_args(list(args), defaults=False)

    def given(self, section: str) -> dict[str, Any]:
        """The options of ``section`` (``"model"``, ``"data"``, ``"trainer"``) that the config file or the command
        line set (whatever their value; defaults left out), as plain dicts and lists.

        Example:
            >>> cli = ToolCLI("visiontune x", ["--model.lr", "0.1", "--model.bn", "eval"])  # doctest: +SKIP
            >>> cli.given("model"), cli.config.model.weights  # doctest: +SKIP
            ({'lr': 0.1, 'bn': 'eval'}, 'hub')
        """
        values = self.given_config.get(section)
        if values is None:
            return {}
        return values.as_dict() if hasattr(values, "as_dict") else dict(values)
