import platform

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs


@needs("torchvision")
def test_resnet18_numbers():
    model = secateurs.load_model("torchvision:resnet18")
    x = secateurs.example_inputs(model)
    assert tuple(x.shape) == (1, 3, 224, 224)
    stats = secateurs.analyze(model, x, latency=False)
    assert stats.params == 11_689_512
    assert stats.macs == pytest.approx(1.82e9, rel=0.01)
    assert sum(layer.macs for layer in stats.layers) == stats.macs
    assert stats.size_bytes == pytest.approx(11_689_512 * 4 + 9600 * 4 + 20 * 8, rel=0.01)
    conv1 = next(layer for layer in stats.layers if layer.name == "conv1")
    assert conv1.shape == [64, 3, 7, 7] and conv1.macs == 64 * 3 * 49 * 112 * 112


def test_linear_and_conv_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    stats = secateurs.analyze(model, torch.randn(2, 3, 4, 4), latency=False)
    expected = 2 * (8 * 3 * 9 * 16 + 128 * 10)
    assert stats.macs == expected
    assert stats.params == 8 * 27 + 8 + 1280 + 10
    assert [layer.macs for layer in stats.layers] == [2 * 8 * 3 * 9 * 16, 2 * 1280]


def test_attention_matmuls_count():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    stats = secateurs.analyze(Attn(), torch.randn(1, 10, 16), latency=False)
    linear = 10 * 16 * 48
    attention = 2 * 10 * 10 * 16  # QK^T and AV
    assert stats.macs == linear + attention
    assert stats.nonzero_macs == stats.macs


def test_size_is_the_saved_file_size(cnn, digits_input, tmp_path):
    secateurs.prune_(cnn, secateurs.Unstructured(sparsity=0.5))
    secateurs.save(cnn, tmp_path / "m")
    stats = secateurs.analyze(secateurs.load(tmp_path / "m"), digits_input, latency=False)
    assert stats.size_bytes == (tmp_path / "m" / "model.safetensors").stat().st_size


def test_nonzero_counts_follow_pruning(cnn, digits_input):
    dense = secateurs.analyze(cnn, digits_input, latency=False)
    secateurs.prune_(cnn, secateurs.Unstructured(sparsity=0.5))
    sparse = secateurs.analyze(cnn, digits_input)
    assert sparse.params == dense.params
    pruned = sum(cnn.get_submodule(n).weight.numel() for n in ("features.0", "features.3", "features.7", "classifier.0"))
    assert dense.nonzero_params - sparse.nonzero_params == pytest.approx(pruned / 2, abs=30)
    assert sparse.macs == dense.macs
    assert sparse.nonzero_macs < 0.55 * dense.macs
    assert sparse.size_bytes < 0.7 * dense.size_bytes
    assert sparse.latency_ms is not None and sparse.latency_ms > 0
    layer = next(layer for layer in sparse.layers if layer.name == "features.3")
    assert layer.type == "Conv2d" and layer.sparsity == pytest.approx(0.5, abs=1e-3)


def test_analysis_leaves_batchnorm_statistics_alone(cnn, digits_input):
    cnn.train()
    before = cnn.features[1].running_mean.clone()
    secateurs.analyze(cnn, digits_input)
    assert torch.equal(cnn.features[1].running_mean, before)
    assert cnn.training


def test_wrong_input_shape_is_a_clear_error(cnn):
    with pytest.raises(secateurs.SecateursError, match="--input-shape"):
        secateurs.analyze(cnn, torch.randn(1, 3, 8, 8), latency=False)


def test_json_keys(cnn, digits_input):
    d = secateurs.analyze(cnn, digits_input, latency=False).to_dict()
    for key in ("params", "nonzero_params", "macs", "latency_ms", "size_bytes", "layers"):
        assert key in d
    assert {"name", "type", "shape", "params", "nonzero", "macs"} <= set(d["layers"][0])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="steady_allocator tunes glibc's malloc only")
def test_steady_allocator_applies_on_glibc():
    from secateurs.analysis import steady_allocator

    assert steady_allocator() is True
    assert steady_allocator() is True  # idempotent


class _Sleeper(nn.Module):
    """A forward that takes a known time; the calls listed in ``slow`` take much longer (a busy machine)."""

    def __init__(self, ms: float, slow: tuple[int, ...] = (), log: list | None = None, name: str = ""):
        super().__init__()
        self.ms, self.slow, self.calls, self.log, self.name = ms, set(slow), 0, log, name

    def forward(self, x):
        import time

        self.calls += 1
        if self.log is not None:
            self.log.append(self.name)
        time.sleep((self.ms * 20 if self.calls in self.slow else self.ms) / 1000)
        return x


def test_latency_is_the_median_of_many_samples_with_its_spread():
    from secateurs.analysis import latency_stats

    # warm-up takes 3 calls; calls 4-8 are the first timed samples, slowed 20x as if the machine were busy
    lat = latency_stats(_Sleeper(2.0, slow=(4, 5, 6, 7, 8)), torch.randn(1), repeats=30)
    assert lat.samples == 30 and lat.calls == 1
    assert 2.0 <= lat.median_ms < 3.5  # the slow fifth moves the median hardly at all
    assert lat.max_ms > 35 and lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms < 10
    quick = latency_stats(nn.Identity(), torch.randn(1), repeats=5)
    assert quick.calls > 1  # a sample of a quick model spans several calls


def test_compared_models_are_timed_in_alternation():
    from secateurs.analysis import compare_latency

    log: list[str] = []
    a, b = _Sleeper(0.5, log=log, name="a"), _Sleeper(1.5, log=log, name="b")
    lat = compare_latency({"a": a, "b": b}, torch.randn(1), warmup=1, repeats=6)
    assert lat["a"].samples == lat["b"].samples == 6
    assert lat["a"].median_ms < lat["b"].median_ms
    timed = [n for i, n in enumerate(log) if i >= 2]  # after one warm-up call each
    runs = [timed[0]]
    for n in timed[1:]:
        if n != runs[-1]:
            runs.append(n)
    assert runs[:4] == ["a", "b", "a", "b"] and len(runs) >= 6  # never all of one model, then the other


def test_analyze_records_the_latency_spread_and_the_table_shows_it(cnn, digits_input):
    from secateurs.report import before_after_table

    d = secateurs.analyze(cnn, digits_input, repeats=8).to_dict()
    q1, q3 = d["latency_iqr_ms"]
    assert d["latency_samples"] == 8 and q1 <= d["latency_ms"] <= q3
    table = before_after_table({"before": d, "after": d | {"latency_ms": d["latency_ms"] / 2}})
    row = next(line for line in table.splitlines() if line.startswith("latency"))
    assert row.startswith("latency, median (IQR)") and f"({q1:.3f}-{q3:.3f})" in row and row.endswith("0.50x")
    assert "IQR" not in before_after_table({"m": {"latency_ms": 1.0}})  # older reports: the median alone
