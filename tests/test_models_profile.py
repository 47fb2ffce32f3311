"""Profiles: balanced split points, the latency model, storage, and a real measurement whose
prediction must land near what the model then takes."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from ectrans.commands import profile as profile_command
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect_sync
from ectrans.common.registry import build_spec
from ectrans.models import measure
from ectrans.models.api import Request
from ectrans.models.device import device_label
from ectrans.models.encoder import build_encoder_segments
from ectrans.models.loader import encoder_splits, load_executor, load_model, seq2seq_splits
from ectrans.models.measure import (
    DECODE_NEW_TOKENS,
    QUICK_GRID,
    Grid,
    profile_encoder,
    profile_seq2seq,
    random_ids_state,
)
from ectrans.models.pipeline import PipelinedExecutor
from ectrans.models.profile import (
    GridPoint,
    LatencyModel,
    Profile,
    balance_splits,
    load_profile,
    profile_path,
    save_profile,
    segment_costs,
)
from tests.test_models_seq2seq import Tiny, generate_ids
from tests.tiny_encoders import make_tiny_bert, one_torch_thread
from tests.tiny_seq2seq import SENTENCES, make_tiny_marian, make_tiny_t5

CPU = torch.device("cpu")


def brute_force_max(costs: list[float], n: int) -> float:
    return min(
        max(segment_costs(costs, list(points))) for points in itertools.combinations(range(1, len(costs)), n - 1)
    )


def test_balance_splits_minimises_the_largest_segment() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        costs = [float(c) for c in rng.uniform(0.1, 5.0, size=int(rng.integers(1, 9)))]
        for n in range(1, len(costs) + 1):
            points = balance_splits(costs, n)
            assert len(points) == n - 1 and points == sorted(set(points))
            assert all(0 < p < len(costs) for p in points)
            assert max(segment_costs(costs, points)) == pytest.approx(brute_force_max(costs, n))


def test_balance_splits_known_cases_and_errors() -> None:
    assert balance_splits([1, 1, 1, 1, 1, 1], 3) == [2, 4]
    assert balance_splits([6, 1, 1, 1, 1, 1], 2) == [1]
    assert balance_splits([1, 2, 3], 1) == []
    with pytest.raises(ValueError, match="between 1 and the 3 units"):
        balance_splits([1, 2, 3], 4)
    with pytest.raises(ValueError, match="non-negative"):
        balance_splits([1, -1], 2)


def test_latency_model_recovers_known_coefficients() -> None:
    points = [(b, t) for b in (1, 4, 16) for t in (16, 64, 128)]
    truth = LatencyModel(a=0.002, b=1e-5, c=0.3)
    fitted = LatencyModel.fit(points, [truth.predict(b, t) for b, t in points])
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((truth.a, truth.b, truth.c), rel=1e-6)
    # Data that a negative constant would fit best: the term is dropped rather than made negative.
    clipped = LatencyModel.fit(points, [max(0.01, 0.002 * b * t - 0.5) for b, t in points])
    assert min(clipped.a, clipped.b, clipped.c) >= 0
    assert all(clipped.predict(b, t) >= 0 for b, t in points)


def sample_profile() -> Profile:
    grid = [
        GridPoint(b, t, [10.0 + 0.01 * b * t, 1.0 + 0.001 * b * t, 1.0 + 0.001 * b * t, 2.0])
        for b in (1, 4, 16)
        for t in (16, 64)
    ]
    return Profile("tiny", "abc123", "cpu", "float32", 1, ["u0", "u1", "u2", "u3"], grid, {"mean": 0.1})


def test_profile_round_trip_and_storage(tmp_path: Path) -> None:
    profile = sample_profile()
    text = profile.to_json()
    data = json.loads(text)
    assert data["splits"]["2"] == profile.splits(2) == [1]  # the heavy first unit stands alone
    assert len(data["latency_models"]) == 4
    again = Profile.from_json(text)
    assert again == profile
    assert again.predict_ms(8, 32) == pytest.approx(profile.predict_ms(8, 32))
    assert sum(again.predict_segments(8, 32, [1, 3])) == pytest.approx(again.predict_ms(8, 32))
    path = save_profile(profile, tmp_path)
    assert path == profile_path("tiny", "abc123", "cpu", tmp_path) == tmp_path / "profiles" / "tiny--abc123--cpu.json"
    assert load_profile("tiny", "abc123", "cpu", tmp_path) == profile
    assert load_profile("tiny", "other", "cpu", tmp_path) is None
    path.write_text("{not json")
    assert load_profile("tiny", "abc123", "cpu", tmp_path) is None


def test_loader_splits_at_the_stored_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = build_spec("tiny", {"path": str(make_tiny_bert(tmp_path / "tiny"))})
    model = load_model(spec, CPU)
    monkeypatch.setenv("ECTRANS_CACHE_DIR", str(tmp_path / "cache"))
    assert encoder_splits(spec, model, CPU, 2) == [2]  # no profile: equal layer counts
    profile = sample_profile()
    profile.revision = spec.revision
    save_profile(profile)
    assert encoder_splits(spec, model, CPU, 2) == [1]


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wide enough that layer time is compute, not Python overhead, yet quick on a CPU."""
    return make_tiny_bert(tmp_path_factory.mktemp("small") / "small-bert", layers=4, hidden=128)


def measured_ms(model: torch.nn.Module, batch: int, tokens: int, repeats: int = 7) -> float:
    segments = build_encoder_segments(model, 2)
    make_state = random_ids_state(int(cast(Any, model).config.vocab_size), CPU, seed=1)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            state = make_state(batch, tokens)
            started = time.perf_counter()
            for segment in segments:
                state = segment(state)
            times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.slow
def test_profile_predicts_an_unseen_batch_within_a_factor_of_two(small_bert: Path) -> None:
    """Bound: predicted/measured in [0.5, 2] for a (batch, tokens) off the grid. Loose on purpose:
    this runs on shared CPUs, where a millisecond-scale timing can easily move by tens of percent."""
    spec = build_spec("small-bert", {"path": str(small_bert)})
    model = load_model(spec, CPU)
    grid = Grid(batches=(1, 4, 16), lengths=(8, 32, 64), repeats=5)
    profile = profile_encoder(spec, model, CPU, grid)
    assert profile.device == device_label(CPU) == "cpu"
    assert len(profile.units) == 4 and len(profile.grid) == 9
    assert set(profile.heldout_error) == {"mean", "max", "points"}
    points = profile.splits(2)
    assert len(points) == 1 and 0 < points[0] < 4
    predicted = profile.predict_ms(8, 48)
    measured = measured_ms(model, 8, 48)
    print(f"predicted {predicted:.3f} ms, measured {measured:.3f} ms, held-out {profile.heldout_error}")
    assert 0.5 <= predicted / measured <= 2.0, (predicted, measured)


def run_profile_command(
    monkeypatch: pytest.MonkeyPatch, models: dict[str, Path], redis_url: str, prefix: str, argv: list[str]
) -> int:
    """`ectrans profile argv` with `models` registered and the test Redis configured."""
    monkeypatch.setenv("ECTRANS_MODELS_JSON", json.dumps({name: {"path": str(path)} for name, path in models.items()}))
    monkeypatch.setenv("ECTRANS_REDIS_URL", redis_url)
    monkeypatch.setenv("ECTRANS_PREFIX", prefix)
    parser = argparse.ArgumentParser()
    profile_command.add_arguments(parser)
    return profile_command.run(parser.parse_args(argv))


def test_profile_command_stores_a_profile(
    small_bert: Path,
    *,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    prefix: str,
) -> None:
    argv = ["small", "--quick", "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path)]
    assert run_profile_command(monkeypatch, {"small": small_bert}, redis_url, prefix, argv) == 0
    out, err = capsys.readouterr()
    assert "2 segments: split at" in out and "stored" in err
    spec = build_spec("small", {"path": str(small_bert)})
    stored = load_profile("small", spec.revision, "cpu", tmp_path)
    assert stored is not None and stored.units[0].startswith("embed+") and stored.units[-1].endswith("+pool")
    assert "published" in err
    with connect_sync(redis_url) as redis:
        published = redis.hget(Keys(prefix).profile("small"), "cpu")
    assert published is not None and Profile.from_json(published.decode()) == stored
    argv = ["no-such-model", "--cache-dir", str(tmp_path)]
    assert run_profile_command(monkeypatch, {"small": small_bert}, redis_url, prefix, argv) == 2


# Encoder-decoder profiles: encoder layer units, then one decode unit of a fixed length.

SEQ2SEQ_UNITS = [
    "encoder:embed+layers0-0",
    "encoder:layers1-1",
    "encoder:layers2-2",
    "encoder:layers3-3+norm",
    "decode",
]


def sample_seq2seq_profile(revision: str = "abc123") -> Profile:
    """A heavy first encoder layer and a decode unit that outweighs the whole encoder."""
    grid = [GridPoint(b, t, [*sample_unit_ms(b, t), 50.0 + 0.1 * b * t]) for b in (1, 4, 16) for t in (16, 64)]
    return Profile("tiny-marian", revision, "cpu", "float32", 1, SEQ2SEQ_UNITS, grid, {}, 1, DECODE_NEW_TOKENS)


def sample_unit_ms(batch: int, tokens: int) -> list[float]:
    return [10.0 + 0.01 * batch * tokens, 1.0 + 0.001 * batch * tokens, 1.0 + 0.001 * batch * tokens, 2.0]


def test_seq2seq_profile_splits_the_encoder_units_only() -> None:
    profile = sample_seq2seq_profile()
    encoder_only = sample_profile()
    assert profile.encoder_units == 4 and encoder_only.encoder_units == 4 and encoder_only.decode_units == 0
    for n in (1, 2, 3, 4):
        assert profile.splits(n) == encoder_only.splits(n)  # the decode unit does not move them
    assert profile.splits(2) == [1]
    with pytest.raises(ValueError, match="between 1 and the 4 units"):
        profile.splits(5)
    data = json.loads(profile.to_json())
    assert sorted(data["splits"], key=int) == ["1", "2", "3", "4"]
    assert (data["decode_units"], data["decode_new_tokens"]) == (1, DECODE_NEW_TOKENS)
    assert Profile.from_json(profile.to_json()) == profile
    segments = profile.predict_segments(8, 32, [1, 3])
    assert len(segments) == 3
    assert sum(segments) + profile.predict_decode_ms(8, 32) == pytest.approx(profile.predict_ms(8, 32))
    assert profile.predict_decode_ms(8, 32) > profile.predict_ms(8, 32) / 2
    assert encoder_only.predict_decode_ms(8, 32) == 0.0
    with pytest.raises(ValueError, match="decode_units"):
        Profile("x", "r", "cpu", "float32", 1, ["decode"], [], {}, 1, 16)


def test_encoder_profiles_stored_before_decode_units_still_load(tmp_path: Path) -> None:
    profile = sample_profile()
    data = json.loads(profile.to_json())
    for key in ("decode_units", "decode_new_tokens"):
        del data[key]  # the format before seq2seq profiles
    path = profile_path("tiny", "abc123", "cpu", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    loaded = load_profile("tiny", "abc123", "cpu", tmp_path)
    assert loaded == profile and loaded.decode_units == 0 and loaded.encoder_units == 4


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_marian(tmp_path_factory.mktemp("marian") / "tiny-marian")


def seq2seq_model(path: Path, name: str = "tiny-marian") -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    spec = build_spec(name, {"path": str(path)})
    return spec, load_model(spec, CPU), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("maker", [make_tiny_marian, make_tiny_t5], ids=["marian", "t5"])
def test_profile_seq2seq_measures_encoder_layers_and_a_fixed_decode(
    maker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, model, tokenizer = seq2seq_model(maker(tmp_path / "model"), "tiny-s2s")
    measured: list[tuple[Any, Any]] = []

    def spy(segments: Any, make_state: Any, grid: Grid, device: torch.device) -> list[GridPoint]:
        measured.append((segments, make_state))
        return measure_units(segments, make_state, grid, device)

    measure_units = measure.measure_units
    monkeypatch.setattr(measure, "measure_units", spy)
    profile = profile_seq2seq(spec, model, tokenizer, CPU, QUICK_GRID)
    assert profile.units == SEQ2SEQ_UNITS
    assert (profile.decode_units, profile.decode_new_tokens, profile.encoder_units) == (1, DECODE_NEW_TOKENS, 4)
    assert len(profile.grid) == 9 and all(ms > 0 for point in profile.grid for ms in point.unit_ms)
    assert set(profile.heldout_error) == {"mean", "max", "points"}
    assert Profile.from_json(profile.to_json()) == profile
    assert 0 < profile.splits(2)[0] < 4
    # The decode unit generated exactly DECODE_NEW_TOKENS tokens for every row, eos or not.
    ((segments, make_state),) = measured
    state = make_state(3, 16)
    for segment in segments:
        state = segment(state)
    assert [len(output["token_ids"]) for output in state.outputs] == [DECODE_NEW_TOKENS] * 3


def test_loader_splits_a_seq2seq_encoder_at_the_stored_profile(
    tiny_marian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, model, tokenizer = seq2seq_model(tiny_marian)
    monkeypatch.setenv("ECTRANS_CACHE_DIR", str(tmp_path))
    assert seq2seq_splits(spec, model, CPU, 2) == [2]  # no profile: even layer counts
    measured = profile_seq2seq(spec, model, tokenizer, CPU, Grid(batches=(1, 4), lengths=(8, 16), repeats=1))
    save_profile(measured)
    assert [seq2seq_splits(spec, model, CPU, n) for n in (2, 3)] == [measured.splits(2), measured.splits(3)]
    encoder_shaped = sample_profile()  # an encoder profile (no decode unit) does not fit a seq2seq model
    encoder_shaped.model, encoder_shaped.revision = spec.name, spec.revision
    save_profile(encoder_shaped)
    assert seq2seq_splits(spec, model, CPU, 2) == [2]
    save_profile(sample_seq2seq_profile(spec.revision))
    assert seq2seq_splits(spec, model, CPU, 2) == [1]
    executor = load_executor(spec, device="cpu", threads=1, segments=2, model=model)
    try:
        assert isinstance(executor, PipelinedExecutor)
        names = [segment.name for segment in executor.segments]
        outputs = {
            beams: executor.submit(Request("translate", SENTENCES, {"num_beams": beams, "max_new_tokens": 16}))
            for beams in (1, 3)
        }
        results = {beams: future.result(timeout=60)[0] for beams, future in outputs.items()}
    finally:
        executor.close()
    assert names == ["encoder:embed+layers0-0", "encoder:layers1-3+norm", "decode"]
    tiny = Tiny(tiny_marian, model, tokenizer)
    for beams, got in results.items():
        assert [result.output["token_ids"] for result in got] == generate_ids(tiny, SENTENCES, beams, 16)


def test_profile_command_profiles_a_seq2seq_model(
    tiny_marian: Path,
    *,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    prefix: str,
) -> None:
    argv = ["marian", "--quick", "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path), "--publish"]
    assert run_profile_command(monkeypatch, {"marian": tiny_marian}, redis_url, prefix, argv) == 0
    out, err = capsys.readouterr()
    assert "2 encoder segments: split at" in out and "4 encoder segments: split at [1, 2, 3]" in out
    assert f"decode ({DECODE_NEW_TOKENS} new tokens, greedy): predicted ms" in out
    assert "held-out points" in out and "stored" in err and "published" in err
    spec = build_spec("marian", {"path": str(tiny_marian)})
    stored = load_profile("marian", spec.revision, "cpu", tmp_path)
    assert stored is not None and stored.units == SEQ2SEQ_UNITS and stored.decode_units == 1
    with connect_sync(redis_url) as redis:
        published = redis.hget(Keys(prefix).profile("marian"), "cpu")
    assert published is not None and Profile.from_json(published.decode()) == stored
