"""``visiontune strategies [NAME]``: what each registered strategy is, and the options of one.

    visiontune strategies          # one line each: name, default LR, mergeable, description
    visiontune strategies lora     # every option of LoRAConfig: type, default and meaning

An option's meaning is its line in the ``Args:`` section of the config dataclass's docstring (or of the base
config it inherits the option from: ``DoRAConfig`` documents none of LoRA's options again). This module imports
the strategies (torch) only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

__all__ = ["StrategyOption", "args_section", "option_docs", "strategies_main", "strategy_options"]

_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w, *]*?)\s*(?:\([^)]*\))?:\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class StrategyOption:
    """One option of a strategy's config dataclass, as ``visiontune strategies NAME`` prints it."""

    name: str
    type: str
    default: Any
    meaning: str


def args_section(doc: str | None) -> dict[str, str]:
    """``{name: meaning}`` from the ``Args:`` section of a Google-style docstring (one entry may name several
    options: ``min_lr, max_lr: ...``; continuation lines are joined).

    Example:
        >>> args_section('''Options.
        ...
        ...     Args:
        ...         rank: rank of each delta
        ...             (> 0).
        ...         a, b: two at once.
        ...
        ...     Example:
        ...         x
        ...     ''')
        {'rank': 'rank of each delta (> 0).', 'a': 'two at once.', 'b': 'two at once.'}
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section (Example:, Returns:, ...)
            break
        indent = depth if indent is None else indent
        match = _ENTRY.match(line.strip()) if depth == indent else None
        if match:
            names = [n.strip().lstrip("*") for n in match.group(1).split(",") if n.strip()]
            for n in names:
                out[n] = match.group(2).strip()
        elif names:  # a continuation line
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def option_docs(config_cls: type) -> dict[str, str]:
    """Each option's meaning, from the ``Args:`` of the class's docstring, else of the nearest base documenting it."""
    docs: dict[str, str] = {}
    for cls in config_cls.__mro__:
        for name, text in args_section(cls.__dict__.get("__doc__")).items():
            docs.setdefault(name, text)
    return docs


def strategy_options(name: str) -> list[StrategyOption]:
    """The options of a registered strategy, in declaration order (a ``StrategyError`` for an unknown name).

    Example:
        >>> [(o.name, o.type, o.default) for o in strategy_options("last_k")]
        [('k', 'int', 1), ('coarse', 'bool', False)]
    """
    from ..strategies import get_strategy

    cls = get_strategy(name).config_cls
    docs = option_docs(cls)
    options = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # pragma: no cover - every strategy option has a default (a strategy is usable by name alone)
            default = None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        options.append(StrategyOption(f.name, kind, default, docs.get(f.name, "")))
    return options


def _yaml(value: Any) -> str:
    """``value`` as it is written in a YAML config (``null``, ``true``, ``[linear, conv]``, ``qv``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def _plain(text: str) -> str:
    """Docstring markup as terminal text: ``x`` and :class:`~a.B` become `x` and `B`."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)
    return text.replace("``", "`")


def _listing() -> str:
    from ..strategies import available_strategies, get_strategy

    rows = [("name", "default LR", "mergeable", "description")]
    for name in available_strategies():
        spec = get_strategy(name)
        cfg = spec.config_cls
        rows.append((name, f"{cfg.default_lr:g}", "yes" if getattr(cfg, "mergeable", False) else "no",
                     _plain(spec.description)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append("options of one: visiontune strategies NAME; use one: --model.strategy NAME "
                 "--model.strategy_args '{option: value}'")
    return "\n".join(line.rstrip() for line in lines)


def _details(name: str) -> str:
    from ..strategies import get_strategy

    spec = get_strategy(name)
    cfg = spec.config_cls
    merge = ("mergeable (visiontune.merge_and_unload bakes it into the base layers)"
             if getattr(cfg, "mergeable", False) else "not mergeable")
    lines = [f"{name}: {_plain(spec.description)}", f"default LR {cfg.default_lr:g} (when model.lr is null); {merge}"]
    options = strategy_options(name)
    if not options:
        lines.append("no options")
    else:
        lines.append(f"options ({cfg.__name__}; --model.strategy_args '{{{options[0].name}: ...}}'):")
        for o in options:
            lines.append(f"  {o.name}: {o.type} = {_yaml(o.default)}")
            lines += textwrap.wrap(_plain(o.meaning) or "(undocumented)", 100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


def strategies_main(argv: Sequence[str]) -> int:
    """``visiontune strategies [NAME]``: list the registered strategies, or print one strategy's options.

    Returns 0, or 2 (one line on stderr naming the known strategies) for an unknown name.
    """
    p = argparse.ArgumentParser(prog="visiontune strategies", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="a strategy: print its options (type, default, meaning)")
    args = p.parse_args(list(argv))
    if args.name is None:
        print(_listing())
        return 0
    from ..strategies import available_strategies

    known = available_strategies()
    if args.name not in known:
        print(f"visiontune strategies: error: unknown strategy {args.name!r}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    print(_details(args.name))
    return 0
