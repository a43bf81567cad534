"""CLI flags come from the config dataclasses' fields: a new method is one module, and cli.py does not change."""

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import secateurs
from conftest import needs
from secateurs import Channels, SecateursError, Unstructured
from secateurs.cli import build_parser, main
from secateurs.cli_options import (
    config_flags,
    config_kwargs,
    option,
    positive_int,
)
from secateurs.masks import set_mask_
from secateurs.methods import LayerReport, PruneReport
from secateurs.methods.common import config_to_dict
from secateurs.selection import Selection, select_targets
from secateurs.zoo import DigitsCNN

CNN = "secateurs.zoo:DigitsCNN"
SHAPE = ["--input-shape", "2,1,8,8"]


@dataclass(kw_only=True)
class ZeroRows(Selection):
    """A toy method, defined here and nowhere in secateurs: zero the first output rows of every layer."""

    method: ClassVar[str] = "zero-rows"

    rows: int = option(1, type=positive_int, metavar="N", help="output rows of every selected layer to zero")
    ratio: float | None = option(None, help="fraction of channels to remove, in [0, 1)")  # shares channel's --ratio


def zero_rows(model: torch.nn.Module, config: ZeroRows, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    targets, skipped = select_targets(model, config, example_inputs=example_inputs)
    report = PruneReport(method=config.method, config=config_to_dict(config), skipped=skipped)
    for t in targets:
        rows = config.rows if config.ratio is None else round(config.ratio * t.weight.shape[0])
        keep = torch.ones_like(t.weight, dtype=torch.bool)
        keep[:rows] = False
        set_mask_(t.module, keep, t.tensor)
        report.layers.append(LayerReport(t.name, list(keep.shape), keep.numel(), int((~keep).sum())))
    return report


@pytest.fixture
def registry(monkeypatch):
    """The built-in methods alone (not those another test or the README registered), restored after the
    test: what a toy registers does not outlive it."""
    from secateurs.methods import registry

    def ours(cls):
        return cls.__module__.startswith("secateurs.")

    monkeypatch.setattr(registry, "_BY_TYPE", {c: fn for c, fn in registry._BY_TYPE.items() if ours(c)})
    monkeypatch.setattr(registry, "_BY_NAME", {n: c for n, c in registry._BY_NAME.items() if ours(c)})
    return registry


@pytest.fixture
def toy(registry):
    registry.register_method(ZeroRows)(zero_rows)
    return ZeroRows


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_registered_method_gets_its_flags_in_prune_help_and_runs(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "zero-rows" in text and "--rows N output rows of every selected layer to zero (method zero-rows; default 1)" in text
    assert "(methods channel, zero-rows)" in text  # --ratio: one flag for both methods
    code, out, err = run(["prune", CNN, *SHAPE, "--method", "zero-rows", "--rows", "3", "--include", "features.0",
                          "--no-latency", "--json", "--out", str(tmp_path / "z")], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["rows"] == 3 and [layer["name"] for layer in result["pruning"]["layers"]] == ["features.0"]
    model = secateurs.load(tmp_path / "z")
    weight = model.features[0].weight
    assert (weight[:3] == 0).all() and (weight[3:] != 0).any()
    assert (model.features[3].weight != 0).all()  # not included


def test_a_shared_flag_reaches_every_method_that_has_the_field(toy, tmp_path, capsys):
    parser = build_parser().commands["prune"]
    options = [o for action in parser._actions for o in action.option_strings]
    assert options.count("--ratio") == 1 and len(options) == len(set(options))
    code, out, err = run(["prune", CNN, *SHAPE, "--method", "zero-rows", "--ratio", "0.25", "--include", "features.0",
                          "--no-latency", "--json", "--out", str(tmp_path / "z")], capsys)
    assert code == 0, err
    assert json.loads(out)["pruning"]["layers"][0]["zeros"] == 8 * 9  # 8 of 32 filters of 1x3x3
    code, _, err = run(["prune", CNN, *SHAPE, "--method", "unstructured", "--rows", "2", "--out", str(tmp_path / "u")],
                       capsys)
    assert code == 2 and "--rows does not apply to --method unstructured" in err


def test_every_option_of_every_command_has_help_and_lists_its_choices():
    parser = build_parser()
    prune_options = [o for action in parser.commands["prune"]._actions for o in action.option_strings]
    assert prune_options.count("--importance") == 1 and len(prune_options) == len(set(prune_options))
    for name, command in [("secateurs", parser), *parser.commands.items()]:
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{name} {label} has no help"
            for choice in action.choices or ():
                assert str(choice) in text, f"{name} {label} does not list {choice}"
    prune = " ".join(parser.commands["prune"].format_help().split())
    for listed in ("channel: l1, l2, bn", "layer: block_influence, angular", "unstructured: magnitude, random"):
        assert listed in prune  # --importance's criteria, by method, from each config's field


def test_built_in_flags_declare_their_help_and_a_method_without_help_breaks_no_command(registry, capsys):
    from secateurs.cli_options import config_flags

    flags = config_flags(list(registry._BY_NAME.values()))
    assert [f.option for f in flags.values() if not f.help] == ["--seed", "--device"]  # the command's own

    @dataclass(kw_only=True)
    class Quiet(Selection):
        method: ClassVar[str] = "quiet"
        rows: int = option(1)  # no help given

    registry.register_method(Quiet)(zero_rows)
    with pytest.raises(SystemExit) as stop:  # the parser still builds
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("secateurs ")
    prune = " ".join(build_parser().commands["prune"].format_help().split())
    assert "--rows ROWS the Quiet.rows field" in prune


def test_bad_declarations_are_refused_when_a_method_registers(registry):
    @dataclass(kw_only=True)
    class OnByDefault(Selection):
        method: ClassVar[str] = "bad1"
        fast: bool = option(True, help="a switch cannot be turned off")

    @dataclass(kw_only=True)
    class NoDashes(Selection):
        method: ClassVar[str] = "bad2"
        knob: int = option(1, flag="knob", help="not an option string")

    for cls, message in ((OnByDefault, "must default to False"), (NoDashes, "must start with --")):
        with pytest.raises(TypeError, match=message):
            registry.register_method(cls)(zero_rows)
    assert "bad1" not in registry.method_names()

    @dataclass(kw_only=True)
    class SwitchRatio(Selection):
        method: ClassVar[str] = "bad3"
        ratio: bool = option(False, help="--ratio as a switch")

    with pytest.raises(TypeError, match="--ratio is a switch for some methods"):
        config_flags([Channels, SwitchRatio])



def _prune_args(*argv):
    return build_parser().parse_args(["prune", CNN, "--out", "o", *argv])


def test_config_kwargs_spread_when_and_underscored_names():
    from secateurs.methods import Layers

    args = _prune_args("--method", "nm", "--nm", "4:8")
    assert config_kwargs(secateurs.NM, args, args.config_flags) == {"n": 4, "m": 8, "seed": 0}
    args = _prune_args("--method", "channel", "--ratio", "0.5", "--device", "cpu")
    assert "device" not in config_kwargs(Channels, args, args.config_flags)  # --device: where a latency is measured
    args = _prune_args("--method", "channel", "--target-latency", "5", "--device", "cpu")
    assert config_kwargs(Channels, args, args.config_flags)["device"] == "cpu"
    notes = []
    args = _prune_args("--method", "layer", "--layers", "1", "--importance", "block-influence")
    assert config_kwargs(Layers, args, args.config_flags, note=notes.append)["importance"] == "block_influence"
    assert notes == ["--importance block-influence is deprecated: use --importance block_influence"]
    with pytest.raises(SecateursError, match="--nm does not apply to --method channel"):
        config_kwargs(Channels, _prune_args("--method", "channel", "--nm", "2:4"), args.config_flags)


def test_scope_is_the_one_python_spelling_and_global_ranking_still_works():
    new = Channels(ratio=0.5, scope="global")
    with pytest.warns(DeprecationWarning, match="use scope='global'"):
        old = Channels(ratio=0.5, global_ranking=True)
    assert old == new and old.global_ranking and dataclasses.replace(old, ratio=0.3).scope == "global"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replace() must not go through the old spelling again
        assert dataclasses.replace(new, scope="layer").scope == "layer"
    with pytest.raises(SecateursError, match="give scope alone"), pytest.warns(DeprecationWarning):
        Channels(ratio=0.5, scope="layer", global_ranking=True)
    with pytest.warns(DeprecationWarning):  # replace() passes the current scope along: no contradiction
        assert dataclasses.replace(new, global_ranking=True) == new
    with pytest.raises(SecateursError, match="scope must be 'layer' or 'global'"):
        Channels(ratio=0.5, scope="everywhere")
    assert "global_ranking" not in config_to_dict(new) and config_to_dict(new)["scope"] == "global"
    x = torch.randn(1, 1, 8, 8)
    torch.manual_seed(0)
    a, b = DigitsCNN(), DigitsCNN()
    b.load_state_dict(a.state_dict())
    secateurs.prune_(a, Channels(target_macs=0.5, scope="global"), example_inputs=x)
    with pytest.warns(DeprecationWarning):
        secateurs.prune_(b, Channels(target_macs=0.5, global_ranking=True), example_inputs=x)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert torch.equal(a(x), b(x))


def test_sensitivity_names_its_grid_as_prune_names_the_amount(capsys):
    from secateurs.cli import _scan_ratios

    base = ["sensitivity", CNN, "--data", "digits", "--out", "s.json"]
    parse = build_parser().parse_args
    assert _scan_ratios(parse([*base, "--ratio", "0.5,0.25,0.5"])) == [0.25, 0.5]
    assert _scan_ratios(parse([*base, "--method", "unstructured", "--sparsity", "0.9"])) == [0.9]
    assert _scan_ratios(parse(base)) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    old = parse([*base, "--ratios", "0.3"])
    assert _scan_ratios(old) == [0.3]
    assert old.deprecations == ["--ratios is deprecated: use --ratio (channel) or --sparsity (unstructured)"]
    with pytest.raises(SecateursError, match="--sparsity is the amount of --method unstructured: --method channel "
                                             "takes --ratio"):
        _scan_ratios(parse([*base, "--sparsity", "0.5"]))
    with pytest.raises(SystemExit):
        parse([*base, "--ratio", "0.5,1.5"])
    assert "each fraction must be in (0, 1)" in capsys.readouterr().err


@needs("sklearn")
def test_sensitivity_cli_scans_with_the_new_and_the_old_spelling_alike(tmp_path, capsys):
    secateurs.save(DigitsCNN(), tmp_path / "m", input_shape=[2, 1, 8, 8])  # one model for both scans
    base = ["sensitivity", str(tmp_path / "m"), "--data", "digits", "--calib-batches", "1", "--method", "unstructured",
            "--include", "classifier", "--json"]
    code, out, err = run([*base, "--sparsity", "0.5,0.9", "--out", str(tmp_path / "new.json")], capsys)
    assert code == 0 and "deprecated" not in err, err
    new = json.loads(out)
    code, out, err = run([*base, "--ratios", "0.5,0.9", "--out", str(tmp_path / "old.json")], capsys)
    assert code == 0 and "secateurs: warning: --ratios is deprecated" in err
    old = json.loads(out)
    assert [c["name"] for c in new["curves"]] == ["classifier.0"] and new["curves"][0]["ratios"] == [0.0, 0.5, 0.9]
    assert new["curves"] == old["curves"]


def test_scans_and_iterative_steps_dispatch_through_the_config(toy):
    from secateurs.methods.sensitivity import scan_methods, sensitivity
    from secateurs.train.iterative import _steps

    class Scanned(ZeroRows):
        def scan(self, model, data, *, ratios, batches, example_inputs=None, progress=None, replay=True):
            return ("scanned", self.rows, list(ratios), len(data))

    assert sensitivity(DigitsCNN(), [torch.randn(2, 1, 8, 8)] * 3, ratios=[0.5, 0.2], batches=2,
                       config=Scanned(rows=4)) == ("scanned", 4, [0.2, 0.5], 2)
    assert scan_methods() == ["channel", "unstructured"]  # ZeroRows itself has no scan
    with pytest.raises(SecateursError, match="ZeroRows cannot scan"):
        sensitivity(DigitsCNN(), [torch.randn(2, 1, 8, 8)], config=ZeroRows())
    with pytest.raises(SecateursError, match="not method 'channel'"):
        sensitivity(DigitsCNN(), [torch.randn(2, 1, 8, 8)], method="channel", config=Unstructured(sparsity=0.5))
    steps = [c.sparsity for c in _steps(DigitsCNN(), Unstructured(sparsity=0.8), 3, None)]
    assert steps[-1] == pytest.approx(0.8) and steps == sorted(steps) and steps[0] > 0.8 / 3  # AGP: big cuts first
    with pytest.raises(SecateursError, match="not a threshold"):
        list(_steps(DigitsCNN(), Unstructured(threshold=0.1), 3, None))
    with pytest.raises(SecateursError, match="steps work with the channel method"):
        list(_steps(DigitsCNN(), ZeroRows(), 3, None))
    x = torch.randn(1, 1, 8, 8)
    ratios = [c.ratio for c in _steps(DigitsCNN(), Channels(ratio=0.75), 2, x)]
    assert ratios == pytest.approx([0.5, 0.5])  # equal geometric shares: (1 - 0.5) ** 2 = 1 - 0.75
