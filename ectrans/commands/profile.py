"""`ectrans profile <model>`: measure each layer's latency over a (batch, tokens) grid on this
device, store the profile (`$ECTRANS_CACHE_DIR/profiles`, default ~/.cache/ectrans/profiles), and
print the balanced split points and the latency model's error on held-out grid points.

For an encoder-decoder (seq2seq) model the units are its encoder layers and one `decode` unit, a
whole greedy generation of a fixed number of new tokens (16); split points divide the encoder.

Executors started later on this device split the model at the stored balanced points. With a Redis
named (`--publish`, or `ECTRANS_REDIS_URL` set), the profile is also written to the hash
`ectrans:profile:<model>`, one field per device, for services and clients on other hosts."""

from __future__ import annotations

import argparse
import os
import sys

from ectrans.common.keys import Keys
from ectrans.common.redis_conn import connect_sync
from ectrans.common.registry import RegistryError, load_registry
from ectrans.common.settings import CommonSettings
from ectrans.models.profile import Profile, save_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an encoder or seq2seq model name from the registry (e.g. minilm)")
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds instead of a minute)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $ECTRANS_CACHE_DIR or ~/.cache/ectrans)"
    )
    parser.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    parser.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write it to Redis (default: when ECTRANS_REDIS_URL is set)",
    )


def summary(profile: Profile) -> str:
    reference = max(profile.grid, key=lambda p: (p.batch * p.tokens, p.batch))
    lines = [
        f"{profile.model} (revision {profile.revision or '-'}) on {profile.device}, {profile.dtype}, "
        f"{profile.threads} thread(s), {len(profile.grid)} grid points",
        f"unit ms at batch {reference.batch} x {reference.tokens} tokens:",
    ]
    lines += [f"  {name:<24} {ms:9.3f}" for name, ms in zip(profile.units, reference.unit_ms, strict=True)]
    what = "encoder segments" if profile.decode_units else "segments"
    for n in range(2, min(4, profile.encoder_units) + 1):
        points = profile.splits(n)
        predicted = profile.predict_segments(reference.batch, reference.tokens, points)
        lines.append(f"{n} {what}: split at {points}, predicted ms {[round(ms, 2) for ms in predicted]}")
    if profile.decode_units:
        decode_ms = profile.predict_decode_ms(reference.batch, reference.tokens)
        lines.append(
            f"decode ({profile.decode_new_tokens} new tokens, greedy): predicted ms {decode_ms:.2f}, "
            "whatever the encoder split"
        )
    error = profile.heldout_error
    if error:
        lines.append(
            f"latency model on {int(error['points'])} held-out points: "
            f"mean relative error {error['mean']:.1%}, max {error['max']:.1%}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # torch and transformers load here, not at import: every other `ectrans` command starts without them.
    import torch

    from ectrans.models.device import DeviceError, set_cpu_threads
    from ectrans.models.loader import choose_device, load_model
    from ectrans.models.measure import FULL_GRID, QUICK_GRID, profile_encoder, profile_seq2seq

    settings = CommonSettings()
    try:
        registry = load_registry(settings.models_file, settings.models_json)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = registry.get(args.model)
    if spec is None:
        print(f"error: unknown model {args.model!r}; known: {sorted(registry)}", file=sys.stderr)
        return 2
    if spec.kind not in ("encoder", "seq2seq"):
        print(f"error: profiling supports encoder and seq2seq models; {spec.name!r} is {spec.kind}", file=sys.stderr)
        return 2
    try:
        device = choose_device(args.device, spec)
        set_cpu_threads(args.threads)
    except (DeviceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = load_model(spec, device)
    grid = QUICK_GRID if args.quick else FULL_GRID
    with torch.inference_mode():
        if spec.kind == "seq2seq":
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
            profile = profile_seq2seq(spec, model, tokenizer, device, grid)
        else:
            profile = profile_encoder(spec, model, device, grid)
    path = save_profile(profile, args.cache_dir)
    print(profile.to_json() if args.json else summary(profile))
    print(f"stored {path}", file=sys.stderr)
    publish = args.publish if args.publish is not None else "ECTRANS_REDIS_URL" in os.environ
    return publish_profile(profile, settings) if publish else 0


def publish_profile(profile: Profile, settings: CommonSettings) -> int:
    """HSET the profile under its device in the model's profile hash; 1 (with a message) on failure."""
    key = Keys(settings.prefix).profile(profile.model)
    try:
        with connect_sync(settings.redis_url) as redis:
            redis.hset(key, profile.device, profile.to_json())
    except Exception as exc:  # the profile is on disk already; say why Redis did not get it
        print(f"error: could not publish the profile to {key}: {exc}", file=sys.stderr)
        return 1
    print(f"published {key} [{profile.device}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="ectrans profile", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
