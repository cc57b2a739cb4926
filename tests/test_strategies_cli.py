"""``visiontune strategies [NAME]``: the list of strategies, and every option of one with type, default, meaning."""

from __future__ import annotations

import dataclasses
import io
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from visiontune.cli import main
from visiontune.cli.strategies import option_docs
from visiontune.strategies import available_strategies, get_strategy

MERGEABLE = {"lora", "qlora", "dora", "ssf"}  # vt.merge_and_unload bakes them into the base layers


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["strategies", *argv])
    return code, out.getvalue(), err.getvalue()


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_listing_one_line_per_strategy_with_lr_and_mergeable():
    code, out, _ = _run()
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.split()}
    for name in available_strategies():
        spec = get_strategy(name)
        _, lr, mergeable, *description = rows[name]
        assert float(lr) == spec.config_cls.default_lr
        assert mergeable == ("yes" if name in MERGEABLE else "no"), name
        assert " ".join(description) == spec.description.replace("``", "`") and description
    assert {n for n in available_strategies() if get_strategy(n).config_cls.mergeable} == MERGEABLE


@pytest.mark.parametrize("name", available_strategies())
def test_every_option_printed_with_type_default_and_meaning(name):
    code, out, _ = _run(name)
    assert code == 0
    cls = get_strategy(name).config_cls
    assert out.splitlines()[0].startswith(f"{name}: ")
    assert f"default LR {cls.default_lr:g}" in out
    printed: dict[str, tuple[str, str, str]] = {}
    current = None
    for line in out.splitlines():
        m = re.fullmatch(r"  (\w+): (.+?) = (.*)", line)
        if m:
            current = m.group(1)
            printed[current] = (m.group(2), m.group(3), "")
        elif current and line.startswith("      "):
            kind, default, meaning = printed[current]
            printed[current] = (kind, default, f"{meaning} {line.strip()}".strip())
    fields = dataclasses.fields(cls)
    assert list(printed) == [f.name for f in fields]  # every option, in declaration order
    docs = option_docs(cls)
    for f in fields:
        kind, default, meaning = printed[f.name]
        assert kind == f.type, f.name
        assert yaml.safe_load(default) == _default(f), (f.name, default)
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no line in its (or its base's) docstring Args:"
        assert meaning and meaning != "(undocumented)"
        letters = [re.sub(r":\w+:|\W", "", t) for t in (meaning, docs[f.name])]  # markup aside
        assert letters[0][-20:] == letters[1][-20:] and letters[0][:5] == letters[1][:5], f.name  # the whole line
    if not fields:
        assert "no options" in out


def test_inherited_options_are_documented_by_the_base():
    from visiontune.strategies.dora import DoRAConfig
    from visiontune.strategies.lora import LoRAConfig, QLoRAConfig

    lora = option_docs(LoRAConfig)
    assert option_docs(DoRAConfig) == lora
    assert option_docs(QLoRAConfig)["bits"].startswith("8 (int8") and option_docs(QLoRAConfig)["rank"] == lora["rank"]


def test_unknown_strategy_is_one_line_naming_the_known_ones_exit_2():
    code, out, err = _run("lorra")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.strip() == ("visiontune strategies: error: unknown strategy 'lorra'; known: "
                           + ", ".join(available_strategies()))
