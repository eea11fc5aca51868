"""`edge-runtime say`: text (argument, --text-file or stdin) -> audio file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge_runtime.runtime import audio


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("say", help="speak text into an audio file",
                              description="Synthesise speech. Text comes from the argument, "
                                          "--text-file, or standard input ('-' or no text).")
    p.add_argument("text", nargs="?", help="text to speak ('-' reads standard input)")
    p.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file")
    p.add_argument("-o", "--output", type=Path, default=Path("out.wav"), help="output file (default out.wav)")
    p.add_argument("--format", choices=sorted(audio.FORMATS), help="audio format (default: from -o suffix, else wav)")
    p.add_argument("--model", help="model: piper:NAME, a Piper .onnx voice, a transformers speech model folder "
                                    "(CSM, Dia, Pocket TTS) or its Hugging Face hub id in the local cache "
                                    "(default: embedded voice)")
    p.add_argument("--allow-download", action="store_true",
                   help="let a hub id missing from the local Hugging Face cache be downloaded "
                        "(never when HF_HUB_OFFLINE is set)")
    p.add_argument("--speaker", help="speaker name or index for multi-speaker voices")
    p.add_argument("--voice", type=Path, help="voice prompt audio (WAV/FLAC/OGG/MP3); Piper voices pick their "
                                              "closest built-in speaker")
    p.add_argument("--voice-text", help="transcript of the voice prompt (models that use one)")
    p.add_argument("--instructions", help="how to speak, e.g. 'Speak happily' (models that follow "
                                          "instructions, such as CosyVoice2; others ignore it)")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate, 0.25-4.0 (default 1.0)")
    p.add_argument("--noise-scale", type=float, help="latent variation (voice default if omitted)")
    p.add_argument("--noise-w", type=float, help="duration variation (voice default if omitted)")
    p.add_argument("--seed", type=int, help="fix the noise for reproducible audio")
    p.add_argument("--captions", type=Path, metavar="OUT.srt|OUT.vtt",
                   help="also write word-timed captions (SRT or WebVTT, by suffix); models with word "
                        "timings only (Piper voices)")
    p.add_argument("--telemetry", help="append per-request telemetry as JSON lines to this file")
    p.set_defaults(handler=run)
    return p


def _read_text(args: argparse.Namespace) -> str:
    from edge_runtime.errors import InvalidInputError

    if args.text_file is not None:
        try:
            return args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read --text-file {args.text_file}: {exc}") from exc
    if args.text is None or args.text == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidInputError("no text given: pass it as an argument, with --text-file, or on stdin")
        return sys.stdin.read()
    return args.text


def run(args: argparse.Namespace) -> int:
    from edge_runtime.runtime.loader import load

    text = _read_text(args)
    fmt = args.format or audio.format_from_path(args.output)
    audio.check_format(fmt)
    speaker = int(args.speaker) if args.speaker and args.speaker.isdigit() else args.speaker
    if args.captions is not None:
        from edge_runtime.runtime.captions import caption_format

        caption_format(args.captions)  # a bad suffix fails before the model loads
    rt = load(args.model, profile=args.profile, overrides=tuple(args.set or ()), telemetry=args.telemetry,
              allow_download=args.allow_download)
    try:
        voice = None
        if args.voice is not None:
            _, voice, _ = rt.prepare_voice(args.voice, transcript=args.voice_text)
        moved_before = rt.placement.get("bytes_moved", 0)
        start = time.perf_counter()
        settings = dict(voice=voice, speed=args.speed, noise_scale=args.noise_scale, noise_w=args.noise_w,
                        speaker=speaker, seed=args.seed, instructions=args.instructions)
        words = None
        if args.captions is not None:
            samples, rate, words = rt.synthesize_with_timings(text, **settings)
        else:
            samples, rate = rt.synthesize(text, **settings)
        elapsed = time.perf_counter() - start
        path = audio.write(args.output, samples, rate, fmt)
        duration = len(samples) / rate
        rtf = elapsed / duration if duration else float("nan")
        print(f"wrote {path} ({duration:.2f} s of audio at {rate} Hz, {fmt}); "
              f"synthesis {elapsed:.2f} s, real-time factor {rtf:.3f}")
        if words is not None:
            from edge_runtime.runtime.captions import write_captions

            written = write_captions(args.captions, text, words)
            print(f"wrote {written} (captions for {len(words)} words)")
        placed = rt.placement
        if placed["backend"] != "resident":
            mib = 1024 * 1024
            print(f"placement: backend {placed['backend']} on {placed['device']}, "
                  f"{placed['resident_bytes'] / mib:.0f} MiB resident, {placed['streamed_bytes'] / mib:.0f} MiB "
                  f"streamed from {placed['target']}; "
                  f"{(placed['bytes_moved'] - moved_before) / mib:.0f} MiB moved in this request")
    finally:  # in-process callers (tests, embedding apps) get the memory back on errors too
        rt.close()
    return 0
