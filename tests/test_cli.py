import json
import subprocess
import sys

import pytest
import torch

import secateurs
from conftest import needs
from secateurs.cli import main
from secateurs.zoo import DigitsCNN

CNN = "secateurs.zoo:DigitsCNN"
SHAPE = ["--input-shape", "2,1,8,8"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_a_loadable_model_and_report(tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code, out, err = run(["prune", CNN, *SHAPE, "--method", "unstructured", "--sparsity", "0.8",
                          "--scope", "global", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "before" in out and "after/before" in out and "nonzero params" in out
    report = json.loads((out_dir / "report.json").read_text())
    for key in ("method", "config", "before", "after", "seconds"):
        assert key in report
    assert report["method"] == "unstructured" and report["config"]["sparsity"] == 0.8
    for key in ("params", "nonzero_params", "macs", "latency_ms", "size_bytes", "layers"):
        assert key in report["before"] and key in report["after"]
    assert report["after"]["size_bytes"] == (out_dir / "model.safetensors").stat().st_size
    assert report["after"]["size_bytes"] < 0.35 * report["before"]["size_bytes"]
    assert report["after"]["nonzero_params"] < 0.25 * report["before"]["nonzero_params"]
    model = secateurs.load(out_dir)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # The saved folder is a MODEL for every command, with its input shape remembered.
    code, out, _ = run(["analyze", str(out_dir), "--json", "--no-latency"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["input_shape"] == [2, 1, 8, 8]
    assert stats["nonzero_params"] == report["after"]["nonzero_params"]


def test_prune_nm_json_output_is_only_json(tmp_path, capsys):
    code, out, _ = run(["prune", CNN, *SHAPE, "--method", "nm", "--nm", "4:8", "--json",
                        "--out", str(tmp_path / "nm")], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["config"]["n"] == 4 and result["config"]["m"] == 8
    layers = {layer["name"]: layer for layer in result["pruning"]["layers"]}
    assert "features.0" not in layers  # 1 input channel: not a multiple of 8
    assert "features.0" in result["pruning"]["skipped"]
    assert all(layer["sparsity"] == 0.5 for layer in layers.values())


def test_threshold_and_ignore_flags(tmp_path, capsys):
    code, _, err = run(["prune", CNN, *SHAPE, "--method", "unstructured", "--threshold", "0.05",
                        "--ignore", "features.0,classifier.0", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    model = secateurs.load(tmp_path / "t")
    assert (model.features[0].weight != 0).all()
    w = model.features[3].weight
    assert (w == 0).any() and (w[w != 0].abs() > 0.05).all()


def test_analyze_json_has_the_contract_keys(capsys):
    code, out, _ = run(["analyze", CNN, *SHAPE, "--json"], capsys)
    stats = json.loads(out)
    assert code == 0
    for key in ("params", "nonzero_params", "macs", "latency_ms", "size_bytes", "layers"):
        assert key in stats
    assert stats["latency_ms"] > 0 and stats["params"] == sum(p.numel() for p in DigitsCNN().parameters())


def test_analyze_table(capsys):
    code, out, _ = run(["analyze", CNN, *SHAPE, "--no-latency"], capsys)
    assert code == 0 and "features.3" in out and "weight shape" in out


ERRORS = [
    (["analyze", "nosuchthing"], "unknown model spec"),
    (["analyze", "missing.pt", "--arch", CNN], "does not exist"),
    (["analyze", "torchvision:resnet18", "--input-shape", "1,x,3"], "input shape"),
    (["analyze", "torchvision:resnet18", "--input-shape", "0,3,224,224"], "input shape"),
    (["analyze", CNN, "--input-shape", "1,3,8,8"], "--input-shape"),
    (["prune", CNN, "--method", "unstructured", "--sparsity", "1.5"], "[0, 1)"),
    (["prune", CNN, "--method", "unstructured", "--sparsity", "-0.1"], "[0, 1)"),
    (["prune", CNN, "--method", "nm", "--nm", "4:4"], "1 <= N < M"),
    (["prune", CNN, "--method", "nm", "--nm", "2-4"], "2:4"),
    (["prune", CNN, "--method", "nm", "--sparsity", "0.5"], "does not apply"),
    (["prune", CNN, "--method", "unstructured", "--sparsity", "0.5", "--ignore", "nope"], "matches no module"),
    (["prune", CNN, "--method", "unstructured", "--threshold", "nan"], "finite"),
    (["analyze", "torch.nn:Linear"], "needs no arguments"),
    (["analyze", "./no/such/dir"], "does not exist"),
    (["prune", CNN, "--method", "channel", "--target-latency", "5", "--device", "bogus"], "unknown device"),
    (["sensitivity", CNN, "--data", "digits", "--out", "no/such/dir/s.json"], "does not exist"),
]


@pytest.mark.parametrize("argv, fragment", ERRORS, ids=[" ".join(a[:4]) for a, _ in ERRORS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "prune":
        argv = [*argv, "--out", "out"]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("secateurs: error:") and fragment in err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


def test_weights_of_another_shape_and_unreadable_images(tmp_path, capsys):
    from PIL import Image

    torch.save(DigitsCNN(num_classes=5).state_dict(), tmp_path / "w5.pt")
    code, _, err = run(["analyze", CNN, *SHAPE, "--weights", str(tmp_path / "w5.pt"), "--no-latency"], capsys)
    assert code == 2 and "do not fit the architecture" in err and "size mismatch" in err
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "img" / cls / "ok.png")
    (tmp_path / "img" / "b" / "broken.jpg").write_text("not an image")
    code, _, err = run(["sensitivity", CNN, *SHAPE, "--data", f"imagefolder:{tmp_path / 'img'}",
                        "--out", str(tmp_path / "s.json")], capsys)
    assert code == 2 and "broken.jpg" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--batch-size", "--batches"])
def test_sizes_and_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", CNN, "--data", "digits", "--out", "s.json", flag, "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_sensitivity_never_writes_over_the_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert run(["prune", CNN, *SHAPE, "--method", "nm", "--out", str(model_dir)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    code, _, err = run(["sensitivity", str(model_dir), "--data", "digits", "--out", str(model_dir / "secateurs.json"),
                        "--overwrite"], capsys)
    assert code == 2 and "input model" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_corrupt_safetensors_model(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run(["analyze", str(bad), "--arch", CNN], capsys)
    assert code == 2 and "not a readable safetensors file" in err


def test_out_must_not_be_the_input_or_non_empty(tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert run(["prune", CNN, *SHAPE, "--method", "nm", "--out", str(model_dir)], capsys)[0] == 0
    before = (model_dir / "model.safetensors").read_bytes()
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["prune", str(model_dir), "--method", "unstructured", "--sparsity", "0.9",
                            "--out", str(model_dir), *extra], capsys)
        assert code == 2 and "input model" in err
    assert (model_dir / "model.safetensors").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    code, _, err = run(["prune", str(model_dir), "--method", "unstructured", "--sparsity", "0.9",
                        "--out", str(other)], capsys)
    assert code == 2 and "--overwrite" in err and (other / "x").exists()


def test_quiet_also_after_the_command(tmp_path, capsys):
    code, out, err = run(["prune", CNN, *SHAPE, "--method", "channel", "--ratio", "0.5", "--no-latency", "--json",
                          "--out", str(tmp_path / "p"), "-q"], capsys)
    assert code == 0 and err == "" and json.loads(out)["pruning"]["method"] == "channel"
    code, _, err = run(["prune", CNN, *SHAPE, "--method", "channel", "--ratio", "0.5", "--latency-batch-size", "4",
                        "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and "--target-latency" in err


def test_argparse_errors_are_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "secateurs.cli", "prune", CNN, "--method", "bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice" in proc.stderr


def test_real_process_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "secateurs.cli", "prune", CNN, "--method", "nm",
                           "--nm", "3:2", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@needs("torchvision")
def test_pickled_model_via_cli(tmp_path, capsys):
    from secateurs.zoo import DigitsCNN

    torch.save(DigitsCNN(), tmp_path / "full.pt")
    code, _, err = run(["analyze", str(tmp_path / "full.pt"), *SHAPE, "--no-latency"], capsys)
    assert code == 2 and "--trust-pickle" in err
    code, _, _ = run(["analyze", str(tmp_path / "full.pt"), *SHAPE, "--no-latency", "--trust-pickle"], capsys)
    assert code == 0


def test_out_paths_that_would_destroy_something_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wdir = tmp_path / "wdir"
    wdir.mkdir()
    torch.save(DigitsCNN().state_dict(), wdir / "w.pth")
    base = ["prune", CNN, *SHAPE, "--method", "nm"]
    code, _, err = run([*base, "--weights", str(wdir / "w.pth"), "--out", str(wdir), "--overwrite"], capsys)
    assert code == 2 and "input model" in err and (wdir / "w.pth").exists()
    code, _, err = run([*base, "--out", ".", "--overwrite"], capsys)
    assert code == 2 and "current directory" in err
    (tmp_path / "afile").write_text("x")
    code, _, err = run([*base, "--out", "afile/sub"], capsys)
    assert code == 2 and "is a file" in err


@needs("transformers")
def test_hf_input_folder_is_protected(tmp_path, capsys):
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "hf")
    code, _, err = run(["prune", f"hf:{tmp_path / 'hf'}", "--method", "nm", "--out", str(tmp_path / "hf"),
                        "--overwrite"], capsys)
    assert code == 2 and "input model" in err and (tmp_path / "hf" / "config.json").exists()
    code, out, err = run(["prune", f"hf:{tmp_path / 'hf'}", "--method", "nm", "--no-latency",
                          "--out", str(tmp_path / "bert24")], capsys)
    assert code == 0, err
    assert secateurs.load(tmp_path / "bert24").config.hidden_size == 16


def test_trust_pickle_with_arch_records_the_recipe(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(net, tmp_path / "seq.pt")
    argv = ["prune", str(tmp_path / "seq.pt"), "--trust-pickle", "--method", "unstructured",
            "--sparsity", "0.5", "--input-shape", "1,8", "--no-latency"]
    code, _, err = run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "does not rebuild" in err and not (tmp_path / "a").exists()
    code, _, err = run([*argv, "--arch", "tests.test_cli:_seq", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    code, _, err = run(["analyze", str(tmp_path / "b"), "--no-latency"], capsys)
    assert code == 2 and "--trust-code" in err
    code, _, err = run(["analyze", str(tmp_path / "b"), "--no-latency", "--trust-code"], capsys)
    assert code == 0, err


def _seq():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _mlp():
    """Eight Linear layers: enough for a long 'left dense' list."""
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(8)])


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"secateurs {version('secateurs')}"


def _bad_data_cases(root):
    (root / "flat").mkdir()
    (root / "flat" / "x.png").write_bytes(b"")  # images, but no class subfolders
    (root / "noimg" / "cat").mkdir(parents=True)
    (root / "noimg" / "cat" / "notes.txt").write_text("x")
    (root / "split" / "train" / "a").mkdir(parents=True)
    (root / "split" / "train" / "a" / "1.png").write_bytes(b"")
    (root / "split" / "val" / "a").mkdir(parents=True)  # val/ holds no image
    (root / "empty.txt").write_text("")
    return [
        (["--data", f"imagefolder:{root / 'flat'}"], "no class subfolders"),
        (["--data", f"imagefolder:{root / 'noimg'}"], "without images (cat)"),
        (["--data", f"imagefolder:{root / 'split'}"], "val' has class subfolders without images (a)"),
        (["--data", f"text:{root / 'empty.txt'}"], "is empty"),
        (["--data", "pydoc", "--finetune-epochs", "1"], "--finetune-epochs trains on labelled images"),
        (["--teacher", "dense"], "also pass --finetune-epochs"),
    ]


def test_data_specs_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded before the data spec was checked")

    monkeypatch.setattr("secateurs.cli._load", no_load)
    for extra, fragment in _bad_data_cases(tmp_path):
        code, out, err = run(["prune", CNN, *SHAPE, "--method", "channel", "--ratio", "0.5", *extra,
                              "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and fragment in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "o").exists()
    for argv in (["eval", CNN, "--data", f"imagefolder:{tmp_path / 'flat'}"],
                 ["sensitivity", CNN, "--data", f"imagefolder:{tmp_path / 'noimg'}", "--out", str(tmp_path / "s.json")],
                 ["finetune", CNN, "--data", f"text:{tmp_path / 'empty.txt'}", "--out", str(tmp_path / "f")]):
        code, _, err = run(argv, capsys)
        assert code == 2 and ("class subfolders" in err or "is empty" in err), err


def test_a_long_left_dense_list_is_summarised(tmp_path, capsys):
    from secateurs.report.table import skipped_summary

    code, out, err = run(["prune", "tests.test_cli:_mlp", "--input-shape", "2,8", "--method", "unstructured",
                          "--sparsity", "0.5", "--ignore", "0,1,2,3,4,5", "--no-latency",
                          "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("left dense"))
    assert lines[start] == "left dense: 7 entries, by reason (the full list is in report.json):"
    assert lines[start + 1] == "  6 ignored: 0, 1, 2 and 3 more"
    assert lines[start + 2] == "  1 output layer: 7"
    skipped = json.loads((tmp_path / "p" / "report.json").read_text())["pruning"]["skipped"]
    assert sorted(skipped) == [str(i) for i in range(6)] + ["7"]  # the whole list stays in report.json
    # a short list stays on one line, in CLI words
    assert skipped_summary({"7": skipped["7"]}) == [f"left dense: 7 ({skipped['7']})"]
    code, out, err = run(["prune", "tests.test_cli:_mlp", "--input-shape", "2,8", "--method", "unstructured",
                          "--sparsity", "0.5", "--ignore", "0", "--no-latency", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    assert "left dense: 0 (ignored), 7 (output layer (set --prune-output-layer to prune it))\n" in out
    many = skipped_summary({f"g{i}": f"kept whole: breaks the forward (error {i})" for i in range(12)}
                           | {f"x{i}": f"reason {i}" for i in range(8)}, kinds=2)
    assert many[1] == "  12 kept whole: breaks the forward: g0, g1, g2 and 9 more"
    assert many[-1] == "   7 for 7 other reasons"


OLD_SPELLINGS = [  # (old argv, new argv, the warnings)
    (["--method", "channel", "--target-macs", "0.5", "--global"],
     ["--method", "channel", "--target-macs", "0.5", "--scope", "global"],
     ["--global is deprecated: use --scope global"]),
    (["--method", "layer", "--layers", "1", "--importance", "block-influence", "--calib", "digits"],
     ["--method", "layer", "--layers", "1", "--importance", "block_influence", "--data", "digits"],
     ["--calib is deprecated: use --data",
      "--importance block-influence is deprecated: use --importance block_influence"]),
]


@pytest.mark.parametrize("old, new, warnings", OLD_SPELLINGS, ids=["global", "calib+block-influence"])
def test_old_spellings_give_the_same_config_with_one_warning_line_each(old, new, warnings, capsys):
    from secateurs.cli import _deprecation, _method_config, build_parser

    configs, errs = [], []
    for argv in (old, new):
        args = build_parser().parse_args(["prune", CNN, *argv, "--out", "o"])
        for note in getattr(args, "deprecations", []):
            _deprecation(note, args)
        configs.append(_method_config(args))
        errs.append(capsys.readouterr().err)
    assert configs[0] == configs[1]
    assert errs[0].splitlines() == [f"secateurs: warning: {w}" for w in warnings] and errs[1] == ""
    assert configs[0].scope == "global" if "channel" in old else configs[0].importance == "block_influence"


@needs("sklearn")
def test_deprecation_lines_in_a_real_run_and_quiet_silences_them(tmp_path, capsys):
    code, out, err = run(["prune", CNN, *SHAPE, "--method", "channel", "--ratio", "0.5", "--global",
                          "--calib", "digits", "--no-latency", "--json", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert json.loads(out)["config"]["scope"] == "global"  # Python spells it scope='global' too
    assert [line for line in err.splitlines() if "deprecated" in line] == [
        "secateurs: warning: --global is deprecated: use --scope global",
        "secateurs: warning: --calib is deprecated: use --data"]
    code, _, err = run(["prune", CNN, "--method", "channel", "--ratio", "0.5", "--global", "-q",
                        "--calib", "imagefolder:/no/such/folder", "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err  # -q: the error alone


def test_sensitivity_batches_spellings():
    from secateurs.cli import build_parser

    base = ["sensitivity", CNN, "--data", "digits", "--out", "s.json"]
    old, new = (build_parser().parse_args([*base, flag, "3"]) for flag in ("--batches", "--calib-batches"))
    assert old.calib_batches == new.calib_batches == 3
    assert old.deprecations == ["--batches is deprecated: use --calib-batches"]
    assert not hasattr(new, "deprecations")


def test_every_option_has_help_and_lists_its_choices():
    from secateurs.cli import build_parser

    parser = build_parser()
    for name, command in [("secateurs", parser), *parser.commands.items()]:
        text = command.format_help()
        for action in command._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            for choice in action.choices or ():
                assert str(choice) in text, f"{name} {action.option_strings[0]} does not list {choice}"
    prune_help = parser.commands["prune"].format_help()
    for criterion in ("l2", "taylor", "block_influence", "magnitude"):
        assert criterion in prune_help  # --importance's names, by method


CLI_WORDS = [
    (["--method", "channel", "--target-macs", "1.5"], "--target-macs must be in (0, 1]"),
    (["--method", "channel", "--ratio", "0.5", "--prune-output-layer"], "so --prune-output-layer does not apply"),
    (["--method", "channel", "--ratio", "0.5", "--allocate", "sensitivity", "--scope", "global"],
     "--allocate sensitivity chooses each group's share itself: drop --scope global"),
    (["--method", "unstructured", "--threshold", "0.1", "--importance", "random"], "use --importance magnitude"),
]


@pytest.mark.parametrize("argv, message", CLI_WORDS, ids=[a[1] + " " + a[-1] for a, _ in CLI_WORDS])
def test_errors_name_cli_flags_not_python_arguments(argv, message, tmp_path, capsys):
    code, _, err = run(["prune", CNN, *SHAPE, *argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err, err


def test_cli_words_leave_quoted_names_and_flagged_messages_alone():
    from secateurs.cli import _in_cli_words

    assert _in_cli_words("layer 'max_ratio' breaks; lower max_ratio", "prune") == \
        "layer 'max_ratio' breaks; lower --max-ratio"
    assert _in_cli_words("resume needs checkpoint_dir (CLI: --checkpoint-dir)", "finetune") == \
        "resume needs checkpoint_dir (CLI: --checkpoint-dir)"
    assert _in_cli_words("pass data= and held_out=", "export") == "pass --data and held_out="
    assert _in_cli_words("set global_ranking=True", "prune") == "set --scope global"


@needs("sklearn")
def test_sensitivity_include_scans_only_the_named_layers_groups(tmp_path, capsys):
    base = ["sensitivity", CNN, *SHAPE, "--data", "digits", "--ratio", "0.5", "--calib-batches", "1", "--json", "-q"]
    code, out, err = run([*base, "--out", str(tmp_path / "all.json")], capsys)
    assert code == 0, err
    assert len(json.loads(out)["curves"]) == 4  # every channel group of DigitsCNN
    code, out, err = run([*base, "--include", "features.0", "--out", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    curves = json.loads(out)["curves"]
    assert len(curves) == 1 and "features.0.weight" in curves[0]["name"]
    assert json.loads((tmp_path / "one.json").read_text())["curves"] == curves
    code, _, err = run([*base, "--include", "features.99", "--out", str(tmp_path / "bad.json")], capsys)
    assert code == 2 and "'features.99'" in err and "check the spelling" in err
    assert not (tmp_path / "bad.json").exists()
